"""The CUDA path: flash-attn against SDPA, bf16 on the GPU against fp32 on the CPU, the KV cache,
SDPA's fast kernels, and the trainer (bf16, ZeRO-0 and ZeRO-3) on one GPU. Skipped where there is
no CUDA device; run them with `scripts/test.sh --gpu` on a GPU machine, or as one stage of
benchmarks/gpu_session.sh (which also measures the MFU there)."""

from __future__ import annotations

import pytest
import torch
from tiny import VARIANTS, make_model, random_tokens

from megaloop.infer.generate import Sampling, generate
from megaloop.model.blocks import flash_installed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
WIDE = {"d_model": 64, "n_heads": 4}  # head dim 16: flash-attn wants a multiple of 8


def on_gpu(model: torch.nn.Module) -> torch.nn.Module:
    return model.to(device="cuda", dtype=torch.bfloat16)


@pytest.mark.skipif(not flash_installed(), reason="flash-attn is not installed")
@pytest.mark.parametrize("variant", ["plain", "linear_r3", "hyperloop", "gqa_qknorm_softcap"])
def test_flash_attention_equals_sdpa(variant):
    settings = {**VARIANTS[variant], **WIDE}
    flash = on_gpu(make_model(perturb=0.05, attention="flash", **settings))
    sdpa = on_gpu(make_model(perturb=0.05, attention="sdpa", **settings))
    tokens = random_tokens(seq=33).cuda()
    losses = []
    for model in (flash, sdpa):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.float())
    torch.testing.assert_close(losses[0], losses[1], atol=2e-2, rtol=0)
    for (name, a), (_, b) in zip(flash.named_parameters(), sdpa.named_parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=5e-2, rtol=5e-2,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("variant", ["plain", "linear_r3", "hyperloop", "mhc"])
def test_bf16_on_the_gpu_matches_fp32_on_the_cpu(variant):
    cpu = make_model(perturb=0.05, **VARIANTS[variant], **WIDE)
    gpu = on_gpu(make_model(perturb=0.05, **VARIANTS[variant], **WIDE))
    tokens = random_tokens(seq=24)
    with torch.no_grad():
        want = cpu(tokens[:, :-1], tokens[:, 1:])
        got = gpu(tokens[:, :-1].cuda(), tokens[:, 1:].cuda()).float().cpu()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=0)


@pytest.mark.parametrize("variant", ["plain", "linear_r3", "hyperloop"])
def test_generation_with_the_cache_on_the_gpu(variant):
    model = on_gpu(make_model(perturb=0.05, **VARIANTS[variant], **WIDE)).eval()
    sampling = Sampling(max_new_tokens=8, temperature=0)
    cached = generate(model, [5, 9, 11, 3], sampling, eos_id=None, use_cache=True)["tokens"]
    uncached = generate(model, [5, 9, 11, 3], sampling, eos_id=None, use_cache=False)["tokens"]
    assert len(cached) == 8 and cached == uncached


def test_sdpa_runs_its_flash_or_cudnn_kernel_for_the_models_attention():
    """In bf16 on the GPU, the model's attention (GQA included) must not need SDPA's math or
    memory-efficient kernels: restricted to flash and cuDNN, the step runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megaloop.train.engine import bf16_autocast

    for variant in ("plain", "gqa_qknorm_softcap"):
        model = make_model(perturb=0.05, **VARIANTS[variant], **WIDE).cuda()
        tokens = random_tokens(seq=33).cuda()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]), \
                bf16_autocast("cuda"):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        assert torch.isfinite(loss)


def test_grouped_heads_in_fp32_do_not_need_sdpas_math_kernel():
    """fp32 (the default precision) with GQA: the memory-efficient kernel must take it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = make_model(perturb=0.05, **VARIANTS["gqa_qknorm_softcap"], **WIDE).cuda()
    tokens = random_tokens(seq=33).cuda()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.CUDNN_ATTENTION]):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("stage", [0, 3])
def test_the_trainer_on_one_gpu_in_bf16(stdlib_shards, tmp_path, stage):
    """`megaloop train` on DeepSpeed's CUDA accelerator and NCCL (no DS_ACCELERATOR), bf16;
    tracking off and the summary from --json, so that it runs where MLflow is not installed."""
    import json
    import subprocess

    from training import assert_ok, child_env, train_command

    env = child_env()
    del env["DS_ACCELERATOR"]
    summary = tmp_path / "summary.json"
    command = train_command(stdlib_shards, tmp_path, "--json", str(summary), **{
        "train.precision": "bf16", "train.zero_stage": stage, "train.steps": 20,
        "train.log_interval": 5, "train.eval_interval": 10, "track.enabled": False})
    assert_ok(subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900))
    result = json.loads(summary.read_text())
    intervals = result["intervals"]
    assert [i["step"] for i in intervals] == [5, 10, 15, 20]
    assert intervals[-1]["loss"] < intervals[0]["loss"] - 1.0
    assert all(0 < i["mfu"] < 1 and i["tokens_per_s"] > 0 for i in intervals)
    assert result["device"].startswith("NVIDIA") and result["peak_flops"] > 1e13
