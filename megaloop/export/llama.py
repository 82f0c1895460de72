"""A megaloop model as `LlamaForCausalLM`, where Llama can express it.

Llama can express every megaloop model with one residual stream, SwiGLU, RMSNorm, RoPE (the same
rotate-half convention: no permutation of q and k is needed) and a plain stack of layers: r = 1,
or a passthrough loop, unrolled into r repeats of its layers (layers = prelude + loop x r + coda,
the repeats share nothing once exported). `llama_lacks` names every feature of any other model
that Llama lacks; `megaloop export-hf` then writes the megaloop transformers model instead.

Weights: the fused `attn.qkv` is split into q, k and v projections, the fused SwiGLU `mlp.inp`
([gate; up]) into gate and up projections; norms map one to one.
"""

from __future__ import annotations

from typing import Any

import torch

from megaloop.config import ModelConfig


def llama_lacks(cfg: ModelConfig) -> list[str]:
    """Every feature of `cfg` that Llama cannot express (empty: Llama can)."""
    lacking = []
    if cfg.hyper != "none":
        lacking.append(f"hyper-connections (model.hyper = {cfg.hyper}): Llama has a single "
                       "residual stream")
    if cfg.mlp != "swiglu":
        lacking.append(f"the {cfg.mlp} MLP (model.mlp = {cfg.mlp}): Llama's MLP is SwiGLU")
    if cfg.qk_norm:
        lacking.append("QK-norm (model.qk_norm = true): Llama does not normalise queries and "
                       "keys")
    if cfg.logit_softcap > 0:
        lacking.append(f"the logit soft-cap (model.logit_softcap = {cfg.logit_softcap})")
    if cfg.recurrence_sampling != "fixed":
        lacking.append(f"sampled recurrences (model.recurrence_sampling = "
                       f"{cfg.recurrence_sampling}): a Llama has a fixed depth")
    if cfg.embedding_norm:
        lacking.append("the RMSNorm after the embedding (model.embedding_norm = true): Llama "
                       "feeds the embedding to its first layer as it is")
    if cfg.has_loop_norm:
        lacking.append("the RMSNorm that ends each pass of the loop (linear injection, or "
                       f"model.recurrence_norm = {cfg.recurrence_norm}): the Llama layers would "
                       "need a norm between the loop's passes and what follows")
    if cfg.is_looped and cfg.injection != "passthrough":
        lacking.append(f"{cfg.injection} input injection (model.injection = {cfg.injection} "
                       f"with r = {cfg.recurrences}): Llama layers cannot read the prelude "
                       "output again; only a passthrough loop unrolls into plain layers")
    return lacking


def layer_sources(cfg: ModelConfig) -> list[str]:
    """The megaloop block behind each Llama layer, in order (the loop unrolled r times)."""
    return ([f"prelude.{i}" for i in range(cfg.prelude_layers)]
            + [f"loop.{i}" for _ in range(cfg.recurrences) for i in range(cfg.loop_layers)]
            + [f"coda.{i}" for i in range(cfg.coda_layers)])


def llama_weights(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    q_dim, kv_dim = cfg.n_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    out = {"model.embed_tokens.weight": state["embed.weight"],
           "model.norm.weight": state["final_norm.weight"]}
    for n, source in enumerate(layer_sources(cfg)):
        layer, block = f"model.layers.{n}.", f"{source}."
        q, k, v = state[block + "attn.qkv.weight"].split([q_dim, kv_dim, kv_dim])
        gate, up = state[block + "mlp.inp.weight"].chunk(2)
        out.update({
            layer + "input_layernorm.weight": state[block + "attn_norm.weight"],
            layer + "self_attn.q_proj.weight": q, layer + "self_attn.k_proj.weight": k,
            layer + "self_attn.v_proj.weight": v,
            layer + "self_attn.o_proj.weight": state[block + "attn.out.weight"],
            layer + "post_attention_layernorm.weight": state[block + "mlp_norm.weight"],
            layer + "mlp.gate_proj.weight": gate, layer + "mlp.up_proj.weight": up,
            layer + "mlp.down_proj.weight": state[block + "mlp.out.weight"],
        })
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {name: tensor.float().contiguous().clone() for name, tensor in out.items()}


def llama_config(cfg: ModelConfig, start_id: int, eos_id: int, norm_eps: float
                 ) -> dict[str, Any]:
    """config.json. BOS is `start_id`, the token every document of the run follows (EOS in
    stream packing: data/dataset.py's document_start_id), so that a prefix of BOS (lm-eval's)
    gives the first token the context it trained with."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": len(layer_sources(cfg)),
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": start_id, "eos_token_id": eos_id, "pad_token_id": None,
        "dtype": "float32",
    }
