"""Generation and evaluation throughput of megaloop's LoopedLM on the CPU, fp32, one process.

Measures, on the quickstart model (configs/runs/tiny.yaml: d 128, 1 -> 2 x 2 -> 1, vocabulary
4096, 256 positions) with random weights, or on a trained checkpoint (`--checkpoint`):
  * sampling tokens/s with the KV cache (the prompt once, then one position per token) and
    without it (the whole sequence again for every token), at the trained r and at more
    recurrences; both produce the same tokens (checked);
  * evaluation tokens/s (forward + loss over batches of train.micro_batch x 256 tokens) at the
    same r values.
  * test-time compute (`--text FILE`, best with a trained `--checkpoint`): per-token early exit
    (latent and KL criteria at several thresholds) and KV budgets against full recurrence, at
    the trained r: decoding tokens/s, mean recurrences per token, and the loss of the text's
    tokens decoded one at a time through the cache (teacher forcing after a prompt), so the
    loss against full recurrence is what the saving costs.
Each figure is the median over `--repeats` runs; runs during which other processes used more than
`--contention` CPU seconds per second are reported as contended (the machine may be shared).

    PYTHONPATH=. python benchmarks/generate_speed.py            # the full run (~1-2 min)
    PYTHONPATH=. python benchmarks/generate_speed.py --quick    # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.contention import Monitor
from benchmarks.harness import machine
from megaloop import config
from megaloop.infer.evaluate import EvalSet, evaluate
from megaloop.infer.generate import Sampling, generate
from megaloop.model.looped import LoopedLM

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).resolve().parent / "out"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "runs" / "tiny.yaml"))
    p.add_argument("--checkpoint", help="a trained checkpoint instead of random weights")
    p.add_argument("--recurrences", default="2,4,8", help="r values (default: 2,4,8)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: decoding a small model is latency-bound)")
    p.add_argument("--contention", type=float, default=0.3,
                   help="other processes' CPU s per s above which a run counts as contended")
    p.add_argument("--text", help="a text for the test-time compute rows (early exit, KV "
                                  "budget)")
    p.add_argument("--decode-tokens", type=int, default=192,
                   help="tokens of --text decoded one at a time (default 192)")
    p.add_argument("--latent", default="0.01,0.03,0.1,0.3",
                   help="thresholds of the latent criterion")
    p.add_argument("--kl", default="0.0001,0.001,0.01,0.1", help="thresholds of the KL criterion")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    p.add_argument("--out", default=str(OUT_DIR / "generate_speed.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.recurrences, args.new_tokens, args.eval_batches, args.repeats = "2", 24, 2, 1
    return args


def load(args: argparse.Namespace) -> tuple[LoopedLM, config.RunConfig]:
    if args.checkpoint:
        from megaloop.export.weights import load_model

        model, loaded = load_model(args.checkpoint)
        return model, loaded.config
    run = config.load(args.config)
    torch.manual_seed(0)
    return LoopedLM(run.model).eval(), run


def timed(fn, args: argparse.Namespace) -> tuple[float, list, int]:
    """Median seconds of `fn` over the repeats, its last result, and how many were contended."""
    seconds, contended, result = [], 0, None
    for _ in range(args.repeats):
        monitor = Monitor()
        with monitor:
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
        seconds.append(elapsed)
        other = monitor.last_other_s
        contended += other is not None and other / elapsed > args.contention
    return statistics.median(seconds), result, contended


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, run = load(args)
    micro_batch = run.train.micro_batch
    cfg = model.cfg
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_tokens,), generator=generator).tolist()
    sampling_args = {"max_new_tokens": args.new_tokens, "temperature": 1.0, "top_k": 50,
                     "seed": 0, "stop_at_eos": False}
    windows = torch.randint(0, cfg.vocab_size, (args.eval_batches, micro_batch,
                                                cfg.max_seq_len + 1), generator=generator)
    data = EvalSet("random tokens", [(w[:, :-1], w[:, 1:]) for w in windows], len(windows),
                   windows[..., 1:].numel(), 1.0)
    rows = []
    for r in [int(x) for x in args.recurrences.split(",")]:
        sampling = Sampling(recurrences=r, **sampling_args)
        cached_s, cached, busy_a = timed(
            lambda s=sampling: generate(model, prompt, s, eos_id=None, use_cache=True), args)
        plain_s, plain, busy_b = timed(
            lambda s=sampling: generate(model, prompt, s, eos_id=None, use_cache=False), args)
        eval_s, _, busy_c = timed(lambda r=r: evaluate(model, data, [r]), args)
        assert cached["tokens"] == plain["tokens"], "the cache changed the sampled tokens"
        rows.append({"recurrences": r, "trained": r == cfg.recurrences,
                     "cache_tokens_per_s": args.new_tokens / cached_s,
                     "no_cache_tokens_per_s": args.new_tokens / plain_s,
                     "speedup": plain_s / cached_s,
                     "eval_tokens_per_s": data.tokens / eval_s,
                     "contended_runs": busy_a + busy_b + busy_c})
    test_time = test_time_rows(model, run, args) if args.text else []
    report = {"date": datetime.date.today().isoformat(), "machine": machine(),
              "command": "PYTHONPATH=. python benchmarks/generate_speed.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "model": {"config": args.config if not args.checkpoint else args.checkpoint,
                        "d_model": cfg.d_model, "layout": f"{cfg.prelude_layers} + "
                        f"{cfg.loop_layers}xr + {cfg.coda_layers}", "vocab": cfg.vocab_size,
                        "trained_recurrences": cfg.recurrences},
              "generation": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                             "sampling": "temperature 1, top-k 50, seed 0"},
              "eval": {"batches": args.eval_batches, "batch": micro_batch,
                       "seq_len": cfg.max_seq_len, "tokens": data.tokens},
              "repeats": args.repeats, "rows": rows, "test_time": test_time}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return report


def decode_text(model: LoopedLM, tokens: torch.Tensor, prompt: int, **cache_settings
                ) -> tuple[float, float, float, int]:
    """(loss in nats, mean recurrences per token, decoding tokens/s, cache bytes) of `tokens`
    (1, T) fed one at a time through a cache with these settings after `prompt` tokens."""
    cache = model.new_cache(**cache_settings)
    with torch.no_grad():
        logits = [model(tokens[:, :prompt], cache=cache)[:, -1:]]
        start = time.perf_counter()
        for i in range(prompt, tokens.shape[1] - 1):
            logits.append(model(tokens[:, i:i + 1], cache=cache))
        if tokens.is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    logits = torch.cat(logits, dim=1)
    loss = torch.nn.functional.cross_entropy(logits[0].float(), tokens[0, prompt:]).item()
    used = [float(u.float().mean()) for u in cache.recurrences_used]
    mean_used = statistics.mean(used) if used else float(model.cfg.recurrences)
    size = sum(t.numel() * t.element_size() for pair in cache.slots.values() for t in pair)
    return loss, mean_used, (tokens.shape[1] - 1 - prompt) / elapsed, size


def test_time_rows(model: LoopedLM, run: config.RunConfig,
                   args: argparse.Namespace) -> list[dict]:
    """Early exit and KV budgets against full recurrence on the tokens of --text."""
    from megaloop.data.dataset import document_start_id, tokenizer_path
    from megaloop.data.tokenizer import Tokenizer
    from megaloop.model.early_exit import EarlyExit

    tokenizer = Tokenizer.load(tokenizer_path(run))
    ids = tokenizer.encode(Path(args.text).read_text())
    length = min(len(ids) + 1, args.prompt_tokens + args.decode_tokens, model.cfg.max_seq_len)
    if length < args.prompt_tokens + 2:
        raise SystemExit(f"{args.text} has {len(ids)} tokens: it needs more than "
                         f"--prompt-tokens {args.prompt_tokens} + 1")
    tokens = torch.tensor([[document_start_id(run, tokenizer), *ids[:length - 1]]])
    settings = [("full recurrence", {})]
    settings += [(f"latent < {t}", {"early_exit": EarlyExit("latent", float(t))})
                 for t in args.latent.split(",")]
    settings += [(f"kl < {t}", {"early_exit": EarlyExit("kl", float(t))})
                 for t in args.kl.split(",")]
    settings += [(f"kv budget {k}", {"kv_budget": k})
                 for k in range(1, model.cfg.recurrences)]
    runs: dict[str, list] = {name: [] for name, _ in settings}
    for _ in range(args.repeats):  # rounds over every setting: drift touches all alike
        for name, cache_settings in settings:
            runs[name].append(decode_text(model, tokens, args.prompt_tokens, **cache_settings))
    full_loss, full_speed = runs["full recurrence"][0][0], statistics.median(
        run[2] for run in runs["full recurrence"])
    rows = []
    for name, _ in settings:
        loss, used = runs[name][0][0], runs[name][0][1]
        speed = statistics.median(run[2] for run in runs[name])
        rows.append({"setting": name, "loss": loss, "loss_vs_full": loss - full_loss,
                     "cache_share": runs[name][0][3] / runs["full recurrence"][0][3],
                     "recurrences_per_token": used, "tokens_per_s": speed,
                     "speed_vs_full": speed / full_speed,
                     "decoded_tokens": tokens.shape[1] - 1 - args.prompt_tokens})
    return rows


def table(report: dict) -> str:
    lines = ["| r | generate, cache (tok/s) | generate, no cache (tok/s) | speed-up | "
             "eval (tok/s) |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        trained = " (trained)" if row["trained"] else ""
        lines.append(f"| {row['recurrences']}{trained} | {row['cache_tokens_per_s']:.1f} | "
                     f"{row['no_cache_tokens_per_s']:.1f} | {row['speedup']:.1f}x | "
                     f"{row['eval_tokens_per_s']:.0f} |")
    if report["test_time"]:
        lines += ["", "| setting | recurrences per token | decode tok/s | vs full | KV cache "
                  "vs full | loss | loss - full |", "|---|---|---|---|---|---|---|"]
        for row in report["test_time"]:
            lines.append(f"| {row['setting']} | {row['recurrences_per_token']:.2f} | "
                         f"{row['tokens_per_s']:.1f} | {row['speed_vs_full']:.2f}x | "
                         f"{row['cache_share']:.2f} | {row['loss']:.4f} | "
                         f"{row['loss_vs_full']:+.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
