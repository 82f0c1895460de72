"""Export to Hugging Face: a folder that `transformers` loads, with the run's sentencepiece
tokenizer (`AutoTokenizer.from_pretrained(folder)` encodes as sentencepiece does).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from megaloop.atomic import atomic_write_json
from megaloop.config import ModelConfig
from megaloop.data.dataset import document_start_id
from megaloop.data.dataset import tokenizer_path as run_tokenizer
from megaloop.data.hf_tokenizer import write_tokenizer
from megaloop.data.tokenizer import Tokenizer, check_vocab
from megaloop.errors import CheckpointError, MegaloopError
from megaloop.export.llama import layer_sources, llama_config, llama_lacks, llama_weights
from megaloop.export.remote_code import (
    CONFIGURATION_FILE,
    MODELING_FILE,
    check_standalone,
    configuration_source,
    modeling_source,
)
from megaloop.export.weights import (
    LoadedCheckpoint,
    model_of,
    read_checkpoint,
    save_safetensors,
)

EXPORT_MARKER = "megaloop_export.json"


# ---- export ----------------------------------------------------------------------------------

def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / EXPORT_MARKER).exists())):
        raise CheckpointError(f"--out {out} exists and is not an empty folder or an earlier "
                              "export-hf output; choose a new folder.")


FORMATS = ("auto", "llama", "megaloop")
TRAINING_ONLY = ("activation_checkpointing",)  # ModelConfig fields a forward pass never reads


def export_hf(checkpoint: str | Path, out: str | Path, tokenizer_path: str | Path | None = None,
              format: str = "auto") -> dict[str, Any]:
    """Write the transformers folder for `checkpoint` to `out` (written beside it, then
    renamed). `format`: llama (LlamaForCausalLM, where Llama can express the model), megaloop
    (MegaloopForCausalLM, any model, with its modeling code; r chosen at run time), auto (llama
    where it can, else megaloop)."""
    if format not in FORMATS:
        raise CheckpointError(f"--format {format}: choose one of {', '.join(FORMATS)}.")
    out = Path(out)
    _check_out(out)
    loaded = read_checkpoint(checkpoint)
    cfg = loaded.config.model
    lacking = llama_lacks(cfg)
    if format == "llama" and lacking:
        raise CheckpointError(f"Cannot export {loaded.path} as a Llama model: Llama lacks "
                              + "; ".join(lacking) + ". Use --format megaloop (or auto), which "
                              "writes the megaloop model for transformers.")
    as_llama = format == "llama" or (format == "auto" and not lacking)
    model = model_of(loaded)  # refuses weights that do not fit their config, before writing
    tokenizer = Tokenizer.load(tokenizer_path or run_tokenizer(loaded.config))
    check_vocab(tokenizer, cfg.vocab_size)
    start_id = document_start_id(loaded.config, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if as_llama:
            save_safetensors(llama_weights(loaded.state_dict, cfg),
                             staging / "model.safetensors", {"format": "pt"})
            atomic_write_json(staging / "config.json",
                              llama_config(cfg, start_id, tokenizer.eos_id,
                                           model.final_norm.eps))
            shape = {"architecture": "LlamaForCausalLM", "layers": len(layer_sources(cfg)),
                     "recurrences_unrolled": cfg.recurrences}
        else:
            write_megaloop_model(loaded, staging, start_id, tokenizer.eos_id)
            shape = {"architecture": "MegaloopForCausalLM", "layers": cfg.effective_depth,
                     "recurrences": cfg.recurrences, "llama_lacks": lacking}
        matches = write_tokenizer(tokenizer, staging, cfg.max_seq_len, start_id)
        summary = {"out": str(out), "checkpoint": str(loaded.path), "step": loaded.step,
                   **shape, "tokenizer": str(tokenizer.path), "tokenizer_matches": matches,
                   "config_hash": loaded.config.hash()}
        atomic_write_json(staging / EXPORT_MARKER, summary)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not matches:
        warnings.warn(f"The tokenizer.json written to {out} encodes some probe texts differently "
                      f"from the sentencepiece model {tokenizer.path}; use tokenizer.model with "
                      "sentencepiece for exact ids.", stacklevel=2)
    return summary


def megaloop_config(cfg: ModelConfig, start_id: int, eos_id: int) -> dict[str, Any]:
    """config.json of MegaloopForCausalLM: ModelConfig's fields, the trained r, auto_map. The
    attention kernel is `auto` (flash-attn where installed, else SDPA: the same attention), so
    that a model trained with flash-attn loads without it; training-only fields are left out."""
    try:
        from megaloop.export.hf_configuration import MegaloopConfig
    except ImportError as exc:
        raise MegaloopError(f"export-hf needs transformers ({exc}); install megaloop[hf] "
                            "(or `pip install 'transformers>=4.45,<6'`).") from None
    fields = {key: value for key, value in dataclasses.asdict(cfg).items()
              if key not in ("recurrences", *TRAINING_ONLY)}
    fields["attention"] = "auto"
    config = MegaloopConfig(trained_recurrences=cfg.recurrences, **fields,
                            num_hidden_layers=cfg.effective_depth, bos_token_id=start_id,
                            eos_token_id=eos_id, architectures=["MegaloopForCausalLM"],
                            dtype="float32",
                            auto_map={"AutoConfig": f"{CONFIGURATION_FILE[:-3]}.MegaloopConfig",
                                      "AutoModelForCausalLM":
                                          f"{MODELING_FILE[:-3]}.MegaloopForCausalLM"})
    return config.to_diff_dict()


def write_megaloop_model(loaded: LoadedCheckpoint, folder: Path, start_id: int,
                         eos_id: int) -> None:
    """MegaloopForCausalLM into `folder`: config.json, model.safetensors (LoopedLM's weights
    under `model.`) and the two generated source files."""
    modeling, configuration = modeling_source(), configuration_source()
    check_standalone(modeling, MODELING_FILE)
    check_standalone(configuration, CONFIGURATION_FILE)
    (folder / MODELING_FILE).write_text(modeling, encoding="utf-8")
    (folder / CONFIGURATION_FILE).write_text(configuration, encoding="utf-8")
    weights = {f"model.{name}": tensor.float().contiguous()
               for name, tensor in loaded.state_dict.items()}
    save_safetensors(weights, folder / "model.safetensors", {"format": "pt"})
    atomic_write_json(folder / "config.json",
                      megaloop_config(loaded.config.model, start_id, eos_id))
