"""`MegaloopForCausalLM`: the megaloop model (model/looped.py) as a transformers causal LM.

An export writes it as `modeling_megaloop.py` after the model's own source (export/remote_code.py
joins config.py's ModelConfig, model/blocks.py, hyper.py, loops.py, early_exit.py, looped.py and
this file), so the model that runs in transformers is the model that trained, line for line, and
imports only torch and transformers. Weights are LoopedLM's under `model.`.

The KV cache is the model's own (`KVCache`: one slot per layer and recurrence), passed as
`cache` (`past_key_values` before transformers 5); `generate` keeps it between steps and feeds
only the new tokens. Its test-time settings (config or generate arguments): `kv_budget`,
`early_exit` and `early_exit_threshold` (configuration_megaloop.py); the recurrences each
decoded token used are in `cache.recurrences_used`. A plain forward keeps no cache unless
`use_cache=True` (lm-eval's scoring passes need none). Batches must not hold padding: the model
has no attention mask (left-padded batched generation is refused).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from megaloop.config import ModelConfig
from megaloop.export.hf_configuration import MegaloopConfig
from megaloop.model.blocks import KVCache, Rotary
from megaloop.model.early_exit import EarlyExit
from megaloop.model.looped import LoopedLM

# transformers 5 names the cache `cache`, 4.x `past_key_values`
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ \
    else "past_key_values"


# what transformers' generate and pipelines pass that this model has no use for
PASSED_OVER = {"return_dict", "cache_position", "position_ids", "output_attentions",
               "output_hidden_states", "logits_to_keep", "num_logits_to_keep", "token_type_ids"}


def model_config(config: MegaloopConfig) -> ModelConfig:
    """megaloop's ModelConfig of a MegaloopConfig (the fields it lacks take their defaults)."""
    names = [entry.name for entry in dataclasses.fields(ModelConfig)]
    values = {name: getattr(config, name) for name in names
              if name != "recurrences" and hasattr(config, name)}
    return ModelConfig(**values, recurrences=config.trained_recurrences)


class MegaloopForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegaloopConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block", "MHCBlock"]
    _supports_sdpa = True

    def __init__(self, config: MegaloopConfig):
        super().__init__(config)
        # megaloop's own initialisation, here and not in _init_weights: transformers releases
        # differ in which modules they hand to it after loading (5.0 re-initialised loaded
        # attention and MLP weights); it is drawn once more than needed before a load
        self.model = LoopedLM(model_config(config))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, Rotary):  # non-persistent tables: made again, never loaded
            module.reset()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache (one slot per layer and recurrence)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.model.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, recurrences: int | None = None,
                past_key_values: KVCache | None = None, kv_budget: int | None = None,
                early_exit: str | None = None, early_exit_threshold: float | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, T, V) in fp32; with `labels`, the mean next-token loss (-100 ignored).
        `recurrences`: the r of this pass (default config.recurrences). The cache comes as
        `cache` (transformers 5) or `past_key_values` (4.x); a new one takes `kv_budget`,
        `early_exit` and `early_exit_threshold` (default: the config's)."""
        unknown = sorted(set(kwargs) - PASSED_OVER)
        if unknown:
            raise TypeError(f"MegaloopForCausalLM.forward got {', '.join(unknown)}: it takes "
                            "input_ids, attention_mask (no padding), cache, labels, use_cache, "
                            "recurrences, kv_budget, early_exit, early_exit_threshold")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MegaloopForCausalLM has no attention mask: this batch holds "
                             "padding. Give sequences of one length (or batch size 1).")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(kv_budget, early_exit, early_exit_threshold)
        r = self.config.recurrences if recurrences is None else recurrences
        logits = self.model(input_ids, recurrences=r, cache=cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_NAME: cache if use_cache else None})

    def new_cache(self, kv_budget: int | None = None, early_exit: str | None = None,
                  threshold: float | None = None) -> KVCache:
        """An empty cache with these test-time settings, else the config's."""
        config = self.config
        kv_budget = config.kv_budget if kv_budget is None else kv_budget
        criterion = config.early_exit if early_exit is None else early_exit
        threshold = config.early_exit_threshold if threshold is None else threshold
        rule = None if criterion == "none" else EarlyExit(criterion, threshold)
        return self.model.new_cache(kv_budget, rule)

    @staticmethod
    def _reorder_cache(cache: KVCache, beam_idx: torch.Tensor) -> KVCache:
        """Beam search's reordering of the rows (transformers 4.x and 5 both call it)."""
        cache.reorder_cache(beam_idx)
        return cache

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor,
                                      attention_mask: torch.Tensor | None = None,
                                      **kwargs) -> dict:
        """The tokens the cache has not seen yet, and the cache."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.length:
            input_ids = input_ids[:, cache.length:]
        return {"input_ids": input_ids, CACHE_NAME: cache, "attention_mask": attention_mask,
                "use_cache": kwargs.get("use_cache", True),
                **{key: kwargs.get(key) for key in ("recurrences", "kv_budget", "early_exit",
                                                     "early_exit_threshold")}}
