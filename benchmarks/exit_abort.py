"""How often a rank aborts at exit after its work is done, ended by `sys.exit` against
`megaloop.process_exit.exit_process` (megaloop/process_exit.py says why it happens).

Each trial starts two gloo ranks (`tests/exit_ranks.py`) that hold their group as DeepSpeed does,
run asynchronous all-gathers whose tensors they drop at once (as ZeRO-3 drops gathered
parameters), destroy the group and end. `--pairs` trials per ending, `--concurrent` at once to load
the cores as a test suite does; a rank's exit status other than 0 is an abort (134: SIGABRT).

    PYTHONPATH=. python benchmarks/exit_abort.py [--pairs 40] [--concurrent 2] [--json OUT]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import harness

RANKS = harness.REPO / "tests" / "exit_ranks.py"


def trial(ending: str, folder: Path, index: int) -> list[int]:
    """The two ranks' exit statuses of one trial."""
    store = folder / f"store-{ending}-{index}"
    ranks = [subprocess.Popen([sys.executable, "-W", "ignore", str(RANKS), str(rank), "2",
                               f"file://{store}", ending],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for rank in range(2)]
    return [rank.wait(timeout=120) for rank in ranks]


def main() -> None:
    parser = harness.parser(__doc__, "exit_abort")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--concurrent", type=int, default=2)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.concurrent) as pool:
        for ending in ("sys.exit", "exit_process"):
            trials = pool.map(trial, [ending] * args.pairs, [Path(tmp)] * args.pairs,
                              range(args.pairs))
            statuses = [code for codes in trials for code in codes]
            aborted = sum(code != 0 for code in statuses)
            results[ending] = {"ranks": len(statuses), "aborted": aborted,
                               "statuses": sorted(set(statuses))}
            print(f"{ending}: {aborted} of {len(statuses)} ranks aborted "
                  f"(exit statuses {sorted(set(statuses))})")
    harness.write_report(args.json, {"pairs": args.pairs, "concurrent": args.concurrent,
                                     "endings": results})


if __name__ == "__main__":
    main()
