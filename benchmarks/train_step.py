"""Training-step benchmark of megaloop's LoopedLM on the CPU, fp32 (and with --bf16 also bf16 as
the trainer's train.precision=bf16 computes it), in one process.

Measures, interleaved round by round so that machine noise falls on every model alike:
  * the matmul peak of this machine (torch.mm, best of several repeats per shape; the highest
    shape is the peak used),
  * forward + backward + AdamW step time (median over steps) of LoopedLM at equal effective
    depth for each r, of a minimal plain PyTorch transformer of the same shape, and of
    transformers.LlamaForCausalLM of the same shape,
  * achieved FLOP/s (tokens/s x megaloop's accounted training FLOPs per token) and its ratio to
    the measured peak, also with the FLOPs each model executes (megaloop's linear injection runs
    W_e e once per pass, where the papers' convention counts it r times),
  * each model against the references twice: in step time (tokens/s) and per executed FLOP
    (achieved FLOP/s; for r > 1 the looped model does more arithmetic per token than a plain
    transformer of the same effective depth),
  * activation memory at the largest r with and without per-recurrence checkpointing,
  * with --bf16: each megaloop r and Hugging Face again under the Engine's bf16 autocast (fp32
    weights, bf16 matmuls, no weight cache), against the same model in fp32 and against HF in
    bf16, with MFU against the bf16 matmul peak.

    PYTHONPATH=. python benchmarks/train_step.py            # the full benchmark (~10 min)
    PYTHONPATH=. python benchmarks/train_step.py --quick    # a smoke run of a few seconds
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.contention import Monitor, wait_for_quiet
from benchmarks.memory import peak_rss_increase, saved_tensor_bytes
from benchmarks.reference_models import HFLlama, ReferenceLooped, ReferenceTransformer
from megaloop.atomic import atomic_write_json
from megaloop.config import ModelConfig
from megaloop.model.accounting import account, executed_flops_per_token
from megaloop.model.looped import LoopedLM
from megaloop.train.engine import bf16_autocast
from megaloop.train.host_memory import reuse_freed_memory
from megaloop.train.parallelize import apply_ac, apply_compile

OUT_DIR = Path(__file__).resolve().parent / "out"
ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
# vs_looped_reference: the "0.95x the minimal reference" read as the reference doing the
# same computation (for r > 1 the plain reference written as a looped model); *_per_flop: the
# ratios read as achieved FLOP/s, each model credited with the FLOPs it executes
TARGETS = {"vs_reference": 0.95, "vs_looped_reference": 0.95, "vs_hf": 1.0,
           "vs_reference_per_flop": 0.95, "vs_hf_per_flop": 1.0, "mfu": 0.75, "mfu_executed": 0.75,
           "checkpoint_memory_ratio": 0.40}


@dataclass
class Entry:
    name: str
    module: torch.nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    flops_per_token: float  # the papers' convention (megaloop.model.accounting)
    layout: str
    executed_flops_per_token: float | None = None  # None: as the convention counts
    dtype: str = "fp32"  # bf16: the loss runs under the Engine's bf16 autocast
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    others: list[float | None] = field(default_factory=list)  # CPU s other processes took

    def __post_init__(self):
        if self.executed_flops_per_token is None:
            self.executed_flops_per_token = self.flops_per_token

    def clean_times(self, threshold_s: float) -> list[float]:
        pairs = zip(self.times, self.others, strict=True)
        return [t for t, o in pairs if o is None or o <= threshold_s]


# ---- configuration ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few steps: a smoke run that checks the harness")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8, help="effective depth")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000, help="32000: the Llama-2 tokenizer size")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=2.75, help="SwiGLU hidden = ratio x d")
    p.add_argument("--edge", type=int, default=2,
                   help="prelude = coda layers for 1 < r < layers (r = layers uses 0 + 1 x r + 0)")
    p.add_argument("--recurrences", default="1,2,4,8", help="comma-separated r values")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    p.add_argument("--steps", type=int, default=15,
                   help="uncontended timed steps wanted per model")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="stop after this many rounds even if steps are contended (3 x steps)")
    p.add_argument("--wait-quiet", type=float, default=1800,
                   help="before each round, wait (in total at most this many seconds) until no "
                        "other process is using the CPU")
    p.add_argument("--contention", type=float, default=0.03,
                   help="a step during which other processes used more CPU seconds than this is"
                        " contended and left out of the medians")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-size", type=int, default=2048, help="square matmul size for the peak")
    p.add_argument("--adamw", choices=["auto", *ADAMW], default="auto",
                   help="AdamW implementation (loop: torch's default on the CPU); auto times "
                        "each and keeps the fastest")
    p.add_argument("--malloc", choices=["system", "reuse"], default="reuse",
                   help="reuse (what megaloop's CPU trainer does): glibc keeps freed memory (no "
                        "mmap, no trim) for every model; system: glibc's defaults")
    p.add_argument("--no-hf", action="store_true", help="skip transformers.LlamaForCausalLM")
    p.add_argument("--compile", action="store_true",
                   help="also time megaloop with train.compile (torch.compile of each block, as "
                        "the trainer does) and HF with each decoder layer compiled")
    p.add_argument("--bf16", action="store_true",
                   help="also time megaloop (each r) and HF in bf16 as train.precision=bf16 "
                        "runs them: fp32 weights under bf16 autocast")
    p.add_argument("--no-checkpoint-row", action="store_true",
                   help="do not time the largest r with per-recurrence checkpointing")
    p.add_argument("--no-memory", action="store_true", help="skip the activation memory phase")
    p.add_argument("--profile", action="store_true",
                   help="also profile megaloop r=1 and the reference (torch.profiler, op tables)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/out/)")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.heads, args.seq, args.vocab, args.batch = 64, 4, 32, 256, 2
        args.warmup, args.steps, args.peak_size, args.max_rounds = 1, 3, 256, 3
        args.wait_quiet = 0
    if args.out is None:
        args.out = OUT_DIR / ("train_step_quick.json" if args.quick else "train_step.json")
    args.recurrences = [int(r) for r in str(args.recurrences).split(",")]
    if args.max_rounds is None:
        args.max_rounds = 3 * args.steps
    return args


def layout(r: int, layers: int, edge: int) -> tuple[int, int, int]:
    """(prelude, loop, coda) with prelude + r * loop + coda = layers."""
    if r == layers:
        return 0, 1, 0
    inner = layers - 2 * edge
    if inner < r or inner % r:
        raise SystemExit(f"r = {r} does not divide the {inner} layers between prelude and coda "
                         f"({layers} layers, --edge {edge})")
    return edge, inner // r, edge


def megaloop_config(args: argparse.Namespace, r: int) -> ModelConfig:
    pre, loop, coda = layout(r, args.layers, args.edge)
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_heads=args.heads,
                       prelude_layers=pre, loop_layers=loop, coda_layers=coda, recurrences=r,
                       mlp="swiglu", mlp_ratio=args.mlp_ratio, tie_embeddings=False,
                       max_seq_len=args.seq, injection="linear")


def megaloop_entry(args: argparse.Namespace, r: int, variant: str = "") -> Entry:
    """LoopedLM at r: plain, `ckpt` (per-recurrence checkpointing) or `compiled` (train.compile:
    train/parallelize.apply_compile; inductor compiles during the warm-up steps)."""
    cfg = megaloop_config(args, r)
    model = LoopedLM(cfg)
    if variant == "ckpt":
        apply_ac(model, "per_recurrence")
    elif variant == "compiled":
        apply_compile(model)
    layout = f"{cfg.prelude_layers} + {cfg.loop_layers}x{r} + {cfg.coda_layers}"
    return Entry(f"megaloop r={r}" + (f" {variant}" if variant else ""), model, model,
                 account(cfg)["flops_per_token"], layout + (", ckpt" if variant == "ckpt" else ""),
                 executed_flops_per_token(cfg))


def in_bf16(entry: Entry) -> Entry:
    """The same model and loss, computed as the trainer's bf16 runs compute it."""
    loss = entry.loss

    def bf16_loss(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with bf16_autocast("cpu"):
            return loss(tokens, targets)

    return Entry(f"{entry.name} bf16", entry.module, bf16_loss, entry.flops_per_token,
                 entry.layout, entry.executed_flops_per_token, dtype="bf16")


def build_entries(args: argparse.Namespace) -> list[Entry]:
    entries = [megaloop_entry(args, r) for r in args.recurrences]
    if not args.no_checkpoint_row:
        entries.append(megaloop_entry(args, max(args.recurrences), "ckpt"))
    base = megaloop_config(args, 1)
    flops = account(base)["flops_per_token"]
    shape = (args.vocab, args.d_model, args.layers, args.heads, base.mlp_hidden, args.seq)
    ref = ReferenceTransformer(*shape)
    entries.append(Entry("reference", ref, ref.loss, flops, f"{args.layers} layers"))
    for r in (r for r in args.recurrences if r > 1):
        cfg = megaloop_config(args, r)
        layout_r = (cfg.prelude_layers, cfg.loop_layers, cfg.coda_layers)
        looped = ReferenceLooped(args.vocab, args.d_model, layout_r, r, args.heads,
                                 base.mlp_hidden, args.seq)
        entries.append(Entry(f"reference r={r}", looped, looped.loss,
                             account(cfg)["flops_per_token"],
                             f"{layout_r[0]} + {layout_r[1]}x{r} + {layout_r[2]}"))
    if not args.no_hf:
        hf = HFLlama(*shape)
        entries.append(Entry("hf llama", hf, hf.loss, flops, f"{args.layers} layers"))
    if args.bf16:
        entries += [in_bf16(megaloop_entry(args, r)) for r in args.recurrences]
        if not args.no_hf:
            hf = HFLlama(*shape)
            entries.append(in_bf16(Entry("hf llama", hf, hf.loss, flops, f"{args.layers} layers")))
    if args.compile:
        entries += [megaloop_entry(args, r, "compiled") for r in args.recurrences]
        if not args.no_hf:  # each decoder layer compiled, as apply_compile does for megaloop
            hf = HFLlama(*shape)
            for layer in hf.model.model.layers:
                layer.compile()
            entries.append(Entry("hf llama compiled", hf, hf.loss, flops,
                                 f"{args.layers} layers"))
    return entries


# ---- measurements -------------------------------------------------------------------------------

def matmul_shapes(args: argparse.Namespace) -> dict[str, tuple[int, int, int]]:
    """(m, k, n): the square peak, and the model's two largest GEMMs (LM head, MLP input)."""
    tokens, hidden = args.batch * args.seq, int(round(args.mlp_ratio * args.d_model))
    n = args.peak_size
    return {f"square {n}": (n, n, n),
            "lm head": (tokens, args.d_model, args.vocab),
            "mlp in": (tokens, args.d_model, 2 * hidden)}


class MatmulPeak:
    """Best torch.mm FLOP/s per shape, sampled between the training steps."""

    def __init__(self, shapes: dict[str, tuple[int, int, int]], dtype: torch.dtype = torch.float32):
        self.operands = {name: (torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype),
                                torch.empty(m, n, dtype=dtype))
                         for name, (m, k, n) in shapes.items()}
        self.flops = {name: 2.0 * m * k * n for name, (m, k, n) in shapes.items()}
        self.best = dict.fromkeys(shapes, float("inf"))

    def sample(self, repeats: int = 3) -> None:
        for name, (a, b, c) in self.operands.items():
            torch.mm(a, b, out=c)
            for _ in range(repeats):
                start = time.perf_counter()
                torch.mm(a, b, out=c)
                self.best[name] = min(self.best[name], time.perf_counter() - start)

    def results(self) -> dict[str, float]:
        return {name: self.flops[name] / t for name, t in self.best.items()}


def make_optimizer(module: torch.nn.Module, impl: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.1, **ADAMW[impl])


def choose_adamw(module: torch.nn.Module, steps: int = 4) -> tuple[str, dict[str, float]]:
    """Time each AdamW implementation on fake gradients; keep the fastest."""
    timings = {}
    snapshot = {k: v.clone() for k, v in module.state_dict().items()}
    for impl in ADAMW:
        opt = make_optimizer(module, impl)
        samples = []
        for _ in range(steps + 1):
            for p in module.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            start = time.perf_counter()
            opt.step()
            samples.append(time.perf_counter() - start)
        timings[impl] = statistics.median(samples[1:])
    module.load_state_dict(snapshot)
    module.zero_grad(set_to_none=True)
    return min(timings, key=timings.get), timings


def train_step(entry: Entry, tokens: torch.Tensor, targets: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = entry.loss(tokens, targets)
    loss.backward()
    entry.optimizer.step()
    entry.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run_timing(entries: list[Entry], peaks: list[MatmulPeak], args: argparse.Namespace,
               tokens: torch.Tensor, targets: torch.Tensor) -> int:
    """Rounds of one step per model, in a rotating order, until every model has `steps`
    uncontended steps (or `max_rounds` rounds have run). Returns the number of rounds."""
    for entry in entries:
        for _ in range(args.warmup):
            train_step(entry, tokens, targets)
    for peak in peaks:
        peak.sample()
    monitor = Monitor(args.contention)
    rounds, waited = 0, 0.0
    while rounds < args.max_rounds and min(
            len(e.clean_times(args.contention)) for e in entries) < args.steps:
        waited += wait_for_quiet(max(0.0, args.wait_quiet - waited))
        shift = rounds % len(entries)  # rotate the order: no model always follows the same one
        for entry in entries[shift:] + entries[:shift]:
            with monitor:
                seconds = train_step(entry, tokens, targets)
            entry.times.append(seconds)
            entry.others.append(monitor.last_other_s)
        for peak in peaks:
            peak.sample(repeats=1)
        rounds += 1
        done = ", ".join(f"{e.name} {e.times[-1]:.3f}s{'*' if _busy(e, args) else ''}"
                         for e in entries)
        print(f"round {rounds} (waited {waited:.0f}s for quiet): {done}", file=sys.stderr,
              flush=True)
    return rounds


def _busy(entry: Entry, args: argparse.Namespace) -> bool:
    return entry.others[-1] is not None and entry.others[-1] > args.contention


def measure_memory(args: argparse.Namespace, tokens: torch.Tensor,
                   targets: torch.Tensor) -> dict[str, object]:
    r = max(args.recurrences)
    cfg = megaloop_config(args, r)
    model = LoopedLM(cfg)
    result: dict[str, object] = {"recurrences": r, "layout": str(layout(r, args.layers, args.edge))}
    for mode in ("none", "per_recurrence"):
        apply_ac(model, mode)
        model.zero_grad(set_to_none=False)
        model(tokens, targets).backward()  # gradients exist from here on, as in training

        result[mode] = {
            "saved_tensor_bytes": saved_tensor_bytes(model, lambda: model(tokens, targets)),
            "peak_rss_increase_bytes": peak_rss_increase(lambda: model(tokens, targets).backward()),
        }
    for key in ("saved_tensor_bytes", "peak_rss_increase_bytes"):
        a, b = result["per_recurrence"][key], result["none"][key]
        result[f"ratio_{key}"] = None if a is None or not b else a / b
    return result


def profile(entries: list[Entry], tokens: torch.Tensor, targets: torch.Tensor,
            out_dir: Path) -> dict[str, str]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for entry in entries:
        if entry.name not in ("megaloop r=1", "reference", "hf llama"):
            continue
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                train_step(entry, tokens, targets)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        path = out_dir / f"profile_{entry.name.replace(' ', '_').replace('=', '')}.txt"
        path.write_text(table)
        tables[entry.name] = str(path)
        print(f"\n## profile: {entry.name} (3 steps)\n{table}")
    return tables


# ---- report ------------------------------------------------------------------------------------

def summarize(entries: list[Entry], peak_flops: dict[str, float], tokens_per_step: int,
              threshold_s: float) -> list[dict]:
    """Medians over the uncontended steps (over all steps where fewer than 3 are clean)."""
    rows = []
    by_name = {e.name: e for e in entries}
    for entry in entries:
        clean = entry.clean_times(threshold_s)
        times = clean if len(clean) >= 3 else entry.times
        median = statistics.median(times)
        tps = tokens_per_step / median
        peak = peak_flops[entry.dtype]
        rows.append({"name": entry.name, "layout": entry.layout, "dtype": entry.dtype,
                     "params": sum(p.numel() for p in entry.module.parameters()),
                     "flops_per_token": entry.flops_per_token, "median_step_s": median,
                     "steps_used": len(times), "steps_run": len(entry.times),
                     "median_all_steps_s": statistics.median(entry.times),
                     "min_step_s": min(entry.times), "max_step_s": max(entry.times),
                     "tokens_per_s": tps, "achieved_flops": tps * entry.flops_per_token,
                     "mfu": tps * entry.flops_per_token / peak,
                     "executed_flops_per_token": entry.executed_flops_per_token,
                     "mfu_executed": tps * entry.executed_flops_per_token / peak})
    for row, entry in zip(rows, entries, strict=True):
        same_shape = entry.name.replace("megaloop", "reference").removesuffix(" ckpt")
        same_shape = "reference" if same_shape == "reference r=1" else same_shape
        pairs = (("vs_reference", "reference"), ("vs_hf", "hf llama"),
                 ("vs_looped_reference", same_shape), ("vs_hf_compiled", "hf llama compiled"))
        if entry.dtype == "bf16":  # against itself in fp32 and against HF in bf16
            pairs = (("vs_fp32", entry.name.removesuffix(" bf16")),
                     ("vs_hf_bf16", "hf llama bf16"))
        for key, other in pairs:
            if key == "vs_looped_reference" and not entry.name.startswith("megaloop"):
                continue
            if key == "vs_hf_compiled" and not entry.name.endswith("compiled"):
                continue
            if other in by_name:
                ref_row = next(x for x in rows if x["name"] == other)
                row[key + "_of_medians"] = row["tokens_per_s"] / ref_row["tokens_per_s"]
                row[key] = paired_speed_ratio(entry, by_name[other], threshold_s)
                if key in ("vs_reference", "vs_hf", "vs_hf_compiled", "vs_hf_bf16"):
                    row[key + "_per_flop"] = row[key] * (entry.executed_flops_per_token
                                                         / ref_row["executed_flops_per_token"])
    return rows


def paired_speed_ratio(entry: Entry, other: Entry, threshold_s: float) -> float:
    """Median over rounds of other's step time / entry's step time in the same round: steps run
    seconds apart, so slow drifts of the machine cancel. Uncontended pairs where 3 or more."""
    pairs = list(zip(entry.times, entry.others, other.times, other.others, strict=True))
    clean = [(a, b) for a, oa, b, ob in pairs
             if (oa is None or oa <= threshold_s) and (ob is None or ob <= threshold_s)]
    used = clean if len(clean) >= 3 else [(a, b) for a, _, b, _ in pairs]
    return statistics.median(b / a for a, b in used)


def markdown(report: dict) -> str:
    st = report["settings"]
    lines = [f"fp32, {report['machine']['threads']} threads, batch {st['batch']} x sequence "
             f"{st['seq']} = {report['tokens_per_step']} tokens/step, d_model {st['d_model']}, "
             f"{st['heads']} heads, {st['layers']} effective layers, SwiGLU hidden "
             f"{int(round(st['mlp_ratio'] * st['d_model']))}, vocab {st['vocab']}, untied; "
             f"AdamW {report['adamw']['impl']}{adamw_timings(report['adamw'])}; "
             f"malloc {report['malloc']}; "
             f"{report['rounds']} rounds.", "",
             "| model | layout | params | step (median) | steps | tokens/s | GFLOP/s | of peak "
             "| of peak, executed | vs ref | vs HF | vs ref of the same shape "
             "| per FLOP vs ref | per FLOP vs HF |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratio_keys = ("vs_reference", "vs_hf", "vs_looped_reference", "vs_reference_per_flop",
                  "vs_hf_per_flop")
    for row in report["rows"]:
        ratio = {k: f"{row[k]:.3f}" if k in row else "-" for k in ratio_keys}
        lines.append(f"| {row['name']} | {row['layout']} | {row['params'] / 1e6:.2f}M "
                     f"| {row['median_step_s'] * 1e3:.0f} ms | {row['steps_used']}"
                     f"/{row['steps_run']} | {row['tokens_per_s']:.0f} "
                     f"| {row['achieved_flops'] / 1e9:.1f} | {row['mfu']:.1%} "
                     f"| {row['mfu_executed']:.1%} | "
                     + " | ".join(ratio[k] for k in ratio_keys) + " |")
    bf16 = [row for row in report["rows"] if row["dtype"] == "bf16"]
    if bf16:
        lines += ["", "bf16 (the Engine's autocast: fp32 weights, bf16 matmuls), of the bf16 "
                  "matmul peak:", "",
                  "| model | step (median) | tokens/s | of bf16 peak, executed | vs fp32 "
                  "| vs HF bf16 | per FLOP vs HF bf16 |", "|---|---|---|---|---|---|---|"]
        for row in bf16:
            cells = [f"{row[k]:.3f}" if k in row else "-"
                     for k in ("vs_fp32", "vs_hf_bf16", "vs_hf_bf16_per_flop")]
            lines.append(f"| {row['name']} | {row['median_step_s'] * 1e3:.0f} ms "
                         f"| {row['tokens_per_s']:.0f} | {row['mfu_executed']:.1%} | "
                         + " | ".join(cells) + " |")
    compiled = [row for row in report["rows"] if "vs_hf_compiled" in row]
    if compiled:
        lines += ["", "Compiled (train.compile; HF with each decoder layer compiled):", "",
                  "| model | vs HF compiled | per FLOP vs HF compiled |", "|---|---|---|"]
        lines += [f"| {row['name']} | {row['vs_hf_compiled']:.3f} "
                  f"| {row['vs_hf_compiled_per_flop']:.3f} |" for row in compiled]
    peak = report["matmul_peak"]
    lines.append("")
    shapes = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peak["by_shape"].items())
    lines.append(f"Matmul peak used: {peak['peak_flops'] / 1e9:.1f} GFLOP/s ({peak['used']}); "
                 f"all shapes (GFLOP/s): {shapes}.")
    if "bf16" in report["matmul_peak"]:
        bf16_peak = report["matmul_peak"]["bf16"]
        lines.append(f"bf16 matmul peak used: {bf16_peak['peak_flops'] / 1e9:.1f} GFLOP/s "
                     f"({bf16_peak['used']}).")
    mem = report.get("memory")
    if mem:
        lines += ["", f"Activation memory at r = {mem['recurrences']} {mem['layout']}:", "",
                  "| measure | no checkpointing | per-recurrence | ratio |", "|---|---|---|---|"]
        for key, label in (("saved_tensor_bytes", "saved for backward"),
                           ("peak_rss_increase_bytes", "peak RSS increase")):
            a, b = mem["none"][key], mem["per_recurrence"][key]
            ratio = mem[f"ratio_{key}"]
            lines.append(f"| {label} | {_mib(a)} | {_mib(b)} | "
                         f"{'-' if ratio is None else f'{ratio:.3f}'} |")
    lines += ["", "Targets:", ""]
    for check in report["targets"]:
        lines.append(f"- {check['what']}: {check['value']:.3f} (target {check['target']}) "
                     f"{'PASS' if check['pass'] else 'MISS'}")
    return "\n".join(lines)


def adamw_timings(adamw: dict) -> str:
    timings = adamw.get("timings_s") or {}
    return " (" + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in timings.items()) + " per step)" \
        if timings else ""


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def check_targets(report: dict) -> list[dict]:
    checks = []
    for row in report["rows"]:
        if not row["name"].startswith("megaloop") or row["name"].endswith(("ckpt", "compiled",
                                                                            "bf16")):
            continue  # the targets are for the trainer's default step
        for key in ("vs_reference", "vs_looped_reference", "vs_hf", "vs_reference_per_flop",
                    "vs_hf_per_flop", "mfu", "mfu_executed"):
            if key in row:
                checks.append({"what": f"{row['name']} {key}", "value": row[key],
                               "target": f">= {TARGETS[key]}",
                               "pass": row[key] >= TARGETS[key]})
    mem = report.get("memory")
    if mem and mem["ratio_saved_tensor_bytes"] is not None:
        value = mem["ratio_saved_tensor_bytes"]
        checks.append({"what": f"r={mem['recurrences']} checkpointed / plain activation memory "
                               "(saved for backward)", "value": value,
                       "target": f"<= {TARGETS['checkpoint_memory_ratio']}",
                       "pass": value <= TARGETS["checkpoint_memory_ratio"]})
    return checks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.malloc == "reuse" and not reuse_freed_memory():
        raise SystemExit("--malloc reuse needs glibc's mallopt; use --malloc system")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    print(f"# train_step benchmark: {harness.cpu_model()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {load_start}", file=sys.stderr)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq))
    targets = torch.randint(0, args.vocab, (args.batch, args.seq))
    # memory first, on a fresh heap: the RSS measure then sees no other model's freed blocks
    memory = None if args.no_memory else measure_memory(args, tokens, targets)
    entries = build_entries(args)
    impl, adamw_timings = (args.adamw, {}) if args.adamw != "auto" else \
        choose_adamw(entries[-1].module)
    for entry in entries:
        entry.optimizer = make_optimizer(entry.module, impl)
    peak = MatmulPeak(matmul_shapes(args))
    peaks = [peak] + ([MatmulPeak(matmul_shapes(args), torch.bfloat16)] if args.bf16 else [])
    rounds = run_timing(entries, peaks, args, tokens, targets)

    by_shape = peak.results()
    used = max(by_shape, key=by_shape.get)
    peak_of = {"fp32": by_shape[used]}
    matmul_peak = {"by_shape": by_shape, "used": used, "peak_flops": by_shape[used]}
    if args.bf16:
        bf16_shapes = peaks[1].results()
        bf16_used = max(bf16_shapes, key=bf16_shapes.get)
        peak_of["bf16"] = bf16_shapes[bf16_used]
        matmul_peak["bf16"] = {"by_shape": bf16_shapes, "used": bf16_used,
                               "peak_flops": bf16_shapes[bf16_used]}
    tokens_per_step = args.batch * args.seq
    report: dict = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "PYTHONPATH=. python benchmarks/train_step.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": harness.machine(load_average_start=load_start,
                                   load_average_end=os.getloadavg()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dtype": "float32", "mlp": "swiglu", "tokens_per_step": tokens_per_step,
        "malloc": args.malloc,
        "adamw": {"impl": impl, "timings_s": adamw_timings},
        "matmul_peak": matmul_peak,
        "rounds": rounds,
        "rows": summarize(entries, peak_of, tokens_per_step, args.contention),
        "step_times_s": {e.name: e.times for e in entries},
        "other_processes_cpu_s": {e.name: e.others for e in entries},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.profile:
        report["profiles"] = profile(entries, tokens, targets, args.out.parent)
    if memory is not None:
        report["memory"] = memory
    report["targets"] = check_targets(report)
    atomic_write_json(args.out, report)
    print(markdown(report))
    print(f"\nJSON: {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
