"""How far bf16 autocast lands from fp32 for hyper-connection models, with the streams mixed in
fp32 (megaloop's `hyper.stream_precision`) and as before, under autocast (the einsums in bf16).

    PYTHONPATH=. python benchmarks/hyper_precision.py [--seeds 8] [--steps 40] [--json OUT]

For Hyperloop, lanes (K = 2) and the looped mHC model at r = 8 (tests/tiny.py's variants at
d 64, vocabulary 256, 64 positions; weights perturbed by N(0, 0.05) so that no gate sits at its
initial value), over `--seeds` seeds:
- forward: the relative L2 error of the bf16 logits against fp32, and |loss_bf16 - loss_fp32|,
  on random tokens (SDPA's math kernel, so every CPU computes the same attention);
- training: `--steps` AdamW steps (lr 1e-3) on one batch of random tokens from the same
  init in fp32 and in bf16; the mean over the steps of |loss_bf16 - loss_fp32|.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from tiny import VARIANTS, make_model, random_tokens  # noqa: E402

from benchmarks.harness import describe, machine  # noqa: E402
from megaloop.model import hyper  # noqa: E402

SHAPE = {"recurrences": 8, "d_model": 64, "vocab_size": 256, "max_seq_len": 64}
MODELS = ["hyperloop", "lanes", "mhc_looped"]
FP32_STREAMS = hyper.stream_precision


def bf16_streams(streams: torch.Tensor) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()  # the code before: autocast stays on for the mixing


@contextlib.contextmanager
def computing(precision: str, streams: str):
    hyper.stream_precision = FP32_STREAMS if streams == "fp32" else bf16_streams
    autocast = (torch.autocast("cpu", torch.bfloat16, cache_enabled=False)
                if precision == "bf16" else contextlib.nullcontext())
    try:
        with sdpa_kernel(SDPBackend.MATH), autocast:
            yield
    finally:
        hyper.stream_precision = FP32_STREAMS


def forward_gaps(name: str, seed: int) -> dict[str, float]:
    model = make_model(seed=seed, perturb=0.05, **{**VARIANTS[name], **SHAPE})
    tokens = random_tokens(batch=4, seq=65, vocab=256, seed=seed)
    with torch.no_grad(), computing("fp32", "fp32"):
        logits = model(tokens[:, :-1]).double()
        loss = model(tokens[:, :-1], tokens[:, 1:]).item()
    row = {}
    for streams in ("fp32", "bf16"):
        with torch.no_grad(), computing("bf16", streams):
            got = model(tokens[:, :-1]).double()
            got_loss = model(tokens[:, :-1], tokens[:, 1:]).item()
        row[f"logit_error_{streams}_streams"] = ((got - logits).norm() / logits.norm()).item()
        row[f"loss_gap_{streams}_streams"] = abs(got_loss - loss)
    return row


def training_losses(name: str, seed: int, steps: int, precision: str, streams: str) -> list:
    model = make_model(seed=seed, **{**VARIANTS[name], **SHAPE})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = random_tokens(batch=8, seq=65, vocab=256, seed=seed)
    losses = []
    for _ in range(steps):
        with computing(precision, streams):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def training_gaps(name: str, seed: int, steps: int) -> dict[str, float]:
    fp32 = training_losses(name, seed, steps, "fp32", "fp32")
    row = {"fp32_first_loss": fp32[0], "fp32_last_loss": fp32[-1]}
    for streams in ("fp32", "bf16"):
        bf16 = training_losses(name, seed, steps, "bf16", streams)
        row[f"train_gap_{streams}_streams"] = statistics.mean(
            abs(a - b) for a, b in zip(fp32, bf16, strict=True))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/out/hyper_precision.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in MODELS:
        rows = [{**forward_gaps(name, seed), **training_gaps(name, seed, args.steps)}
                for seed in range(args.seeds)]
        results[name] = {key: statistics.mean(row[key] for row in rows) for key in rows[0]}
        results[name]["seeds"] = rows
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "settings": vars(args) | {"json": str(args.json)},
              "shape": SHAPE, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"{describe(report['machine'])}, native bf16: {report['machine']['native_bf16']}, "
          f"{args.seeds} seeds")
    print("| model | logit error, fp32 streams | bf16 streams | ratio | loss gap, fp32 streams "
          "| bf16 streams | training gap, fp32 streams | bf16 streams |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = r["logit_error_fp32_streams"] / r["logit_error_bf16_streams"]
        print(f"| {name} | {r['logit_error_fp32_streams']:.2e} | "
              f"{r['logit_error_bf16_streams']:.2e} | {ratio:.2f} | "
              f"{r['loss_gap_fp32_streams']:.1e} | {r['loss_gap_bf16_streams']:.1e} | "
              f"{r['train_gap_fp32_streams']:.4f} | {r['train_gap_bf16_streams']:.4f} |")


if __name__ == "__main__":
    main()
