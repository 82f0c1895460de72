"""The CUDA path: flash-attn against SDPA, bf16 on the GPU against fp32 on the CPU, the KV cache,
and the trainer (bf16, ZeRO-3) on one GPU. Skipped where there is no CUDA device; run them with
`scripts/test.sh --gpu` on a GPU machine (benchmarks/gpu_mfu.py measures the MFU there)."""

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


def test_the_trainer_on_one_gpu_in_bf16_with_zero3(stdlib_shards, tmp_path):
    import subprocess

    from training import assert_ok, child_env, history, only_run, train_command

    env = child_env()
    del env["DS_ACCELERATOR"]  # DeepSpeed's CUDA accelerator and NCCL, as on a cluster
    command = train_command(stdlib_shards, tmp_path, **{
        "train.precision": "bf16", "train.zero_stage": 3, "train.steps": 20,
        "train.eval_interval": 10})
    assert_ok(subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900))
    losses = history(tmp_path)
    assert losses[20][0] < losses[1][0] - 1.0
    run = only_run(tmp_path)
    assert 0 < run.data.metrics["train/mfu"] < 1
    assert run.data.tags["megaloop.host_allocator"] == "CUDA"
