"""The GPU path proven on the CPU: every call megaloop (and benchmarks/) makes on DeepSpeed's
accelerator and on `torch.cuda` exists there with the arguments given (read from the source),
and the Engine, the trainer, its checkpoints and its MFU run their CUDA branches here against
DeepSpeed's real `CUDA_Accelerator` class (autospec'd: a method it lacks, or a wrong signature,
fails) with the tensors kept on the CPU. A line tracer shows that every GPU-side branch of the
rooms that ask the device ran."""

from __future__ import annotations

import ast
import contextlib
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from tiny import REPO, run_trainer, trainer_config

from megaloop import device as device_module
from megaloop.device import CPU, Device

ACCELERATOR_FACTORIES = {"accelerator", "get_accelerator"}
SCANNED = [REPO / "megaloop", REPO / "benchmarks"]
CARD = "NVIDIA H100 80GB HBM3"


def cuda_accelerator_class():
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
    return CUDA_Accelerator


# ---- the calls, read from the source -----------------------------------------------------------

def _is_accelerator_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    return name in ACCELERATOR_FACTORIES


def _is_torch_cuda(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "cuda"
            and isinstance(node.value, ast.Name) and node.value.id == "torch")


def device_calls(source: str) -> list[tuple[str, str, int, ast.Call | None]]:
    """(owner, attribute, line, the call or None) of every attribute used on DeepSpeed's
    accelerator (`accelerator().x`, `get_accelerator().x`, or a name bound to one of those) and
    on `torch.cuda` (`torch.cuda.x`) in `source`."""
    tree = ast.parse(source)
    bound = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and _is_accelerator_call(node.value)
             for target in node.targets if isinstance(target, ast.Name)}
    calls = {id(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = None
        if _is_accelerator_call(node.value) or (isinstance(node.value, ast.Name)
                                                and node.value.id in bound):
            owner = "accelerator"
        elif _is_torch_cuda(node.value):
            owner = "torch.cuda"
        if owner:
            found.append((owner, node.attr, node.lineno, calls.get(id(node))))
    return found


def call_problem(target, call: ast.Call | None, bound_method: bool) -> str | None:
    """Why `call` cannot call `target` (a missing argument, one too many, an unknown keyword),
    or None; arguments spread with * or ** are not judged."""
    if call is None or any(isinstance(a, ast.Starred) for a in call.args) \
            or any(k.arg is None for k in call.keywords):
        return None
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: existence is all we check
        return None
    args = [None] * (len(call.args) + bound_method)
    try:
        signature.bind(*args, **{k.arg: None for k in call.keywords})
    except TypeError as exc:
        return str(exc)
    return None


def device_call_problems(source: str, where: str) -> list[str]:
    accelerator_class = cuda_accelerator_class()
    problems = []
    for owner, name, line, call in device_calls(source):
        home = accelerator_class if owner == "accelerator" else torch.cuda
        if not hasattr(home, name):
            problems.append(f"{where}:{line}: {owner}.{name} does not exist on "
                            f"{getattr(home, '__name__', home)}")
            continue
        target = getattr(home, name)
        if callable(target):
            problem = call_problem(target, call, bound_method=owner == "accelerator")
            if problem:
                problems.append(f"{where}:{line}: {owner}.{name}(...): {problem}")
    return problems


def test_the_scan_catches_a_call_cuda_accelerator_lacks_and_a_wrong_signature():
    """The call that would have killed every CUDA run at set-up, and its neighbours."""
    source = ("def name():\n"
              "    return accelerator().get_device_name()\n"
              "def sync():\n"
              "    found = get_accelerator()\n"
              "    found.synchronize(0, 1)\n"
              "    found.set_rng_state(state=None)\n"
              "    torch.cuda.max_memory_allocted()\n"
              "    torch.cuda.get_device_name(0)\n"
              "    return accelerator().device_name(0)\n")
    problems = device_call_problems(source, "snippet")
    assert len(problems) == 4, problems
    assert "snippet:2: accelerator.get_device_name does not exist" in problems[0]
    assert any(":5:" in p and "synchronize" in p for p in problems)
    assert any(":6:" in p and "set_rng_state" in p for p in problems)  # new_state is missing
    assert any(":7:" in p and "max_memory_allocted" in p for p in problems)


def test_every_accelerator_and_torch_cuda_call_exists_on_cuda():
    """megaloop/ and benchmarks/ ask DeepSpeed's accelerator and torch.cuda only for what
    DeepSpeed's CUDA_Accelerator and torch.cuda have, with arguments their signatures take."""
    problems, seen = [], set()
    for folder in SCANNED:
        for path in sorted(folder.rglob("*.py")):
            source = path.read_text()
            where = str(path.relative_to(REPO))
            problems += device_call_problems(source, where)
            seen.update((owner, name) for owner, name, *_ in device_calls(source))
    assert not problems, "\n".join(problems)
    # the scan reads what it should: the Device's calls are among those it found
    assert {("accelerator", "max_memory_reserved"), ("accelerator", "get_rng_state"),
            ("torch.cuda", "get_device_name")} <= seen, seen


# ---- the GPU branches, run --------------------------------------------------------------------

def one_gpu_accelerator():
    """DeepSpeed's CUDA_Accelerator, autospec'd, answering as a machine with one H100 would;
    its generator state is a CPU tensor of CUDA's size (16 bytes)."""
    accelerator = mock.create_autospec(cuda_accelerator_class(), instance=True)
    accelerator.device_name.side_effect = lambda device_index=None: (
        "cuda" if device_index is None else f"cuda:{device_index}")
    accelerator.communication_backend_name.return_value = "nccl"
    accelerator.device_count.return_value = 1
    accelerator.is_bf16_supported.return_value = True
    accelerator.max_memory_allocated.return_value = 3 * 2**30
    accelerator.max_memory_reserved.return_value = 5 * 2**30
    accelerator.get_rng_state.return_value = torch.arange(16, dtype=torch.uint8)
    accelerator.synchronize.return_value = None
    return accelerator


@contextlib.contextmanager
def one_gpu_machine(monkeypatch):
    """megaloop's device questions answered by the autospec'd CUDA accelerator and an
    autospec'd `torch.cuda.get_device_name`; DeepSpeed itself keeps its CPU accelerator (its
    collectives and checkpoints work here). Pinning is recorded: without CUDA torch cannot pin,
    so a pinned batch is the batch itself here."""
    accelerator = one_gpu_accelerator()
    monkeypatch.setattr(device_module, "accelerator", lambda: accelerator)
    pinned = []

    def pin_memory(tensor, *args, **kwargs):
        pinned.append(tuple(tensor.shape))
        return tensor

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    with mock.patch("torch.cuda.get_device_name", autospec=True, return_value=CARD) as name:
        yield accelerator, name, pinned


# A CUDA device whose tensors live on the CPU: the Device's kind decides the branches.
CUDA_ON_THE_CPU = Device("cuda", 0, torch.device("cpu"))


def test_the_device_asks_the_cuda_accelerator_with_the_arguments_it_takes(monkeypatch):
    with one_gpu_machine(monkeypatch) as (accelerator, name, pinned):
        device = Device.of_this_process()
        assert (device.kind, device.index, device.tensors) == ("cuda", 0, torch.device("cuda", 0))
        gpu = CUDA_ON_THE_CPU
        assert gpu.name() == CARD and name.call_args == mock.call(0)
        assert gpu.bf16_native() and gpu.communication_backend() == "nccl"
        gpu.make_current()
        gpu.synchronize()
        assert gpu.peak_memory() == (3.0, 5.0)
        gpu.reset_peak_memory()
        gpu.release_cached_memory()
        state = gpu.rng_state()
        gpu.set_rng_state(state)
        batch = gpu.to_device(torch.ones(2, 3))
        assert batch.shape == (2, 3) and pinned == [(2, 3)]
    accelerator.set_device.assert_called_once_with(0)
    accelerator.synchronize.assert_called_once_with(0)
    accelerator.set_rng_state.assert_called_once_with(state, 0)
    accelerator.reset_peak_memory_stats.assert_called_once_with(0)
    accelerator.empty_cache.assert_called_once_with()
    assert CPU.peak_memory().reserved_gib is None and CPU.rng_state() is None


def gpu_side(test: ast.expr) -> str | None:
    """Where an `if` on a Device's `is_cpu` / `is_cuda` runs only on a GPU: "body" (the
    condition holds only there), "orelse" (it fails only there), or None (it says nothing of
    the device)."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return {"body": "orelse", "orelse": "body", None: None}[gpu_side(test.operand)]
    if isinstance(test, ast.Attribute) and test.attr in ("is_cpu", "is_cuda"):
        return "body" if test.attr == "is_cuda" else "orelse"
    if isinstance(test, ast.BoolOp):
        sides = {gpu_side(value) for value in test.values}
        # all of an `and` hold where it is true; none of an `or` holds where it is false
        wanted = "body" if isinstance(test.op, ast.And) else "orelse"
        return wanted if wanted in sides else None
    return None


def device_branch_lines(path: Path) -> set[int]:
    """The lines of `path` that only a GPU runs: the GPU side of every `if` on a Device's kind,
    and the statements after an `if` whose CPU side returns."""
    def lines_of(statements: list[ast.stmt]) -> set[int]:
        return {line for s in statements for line in range(s.lineno, s.end_lineno + 1)}

    found: set[int] = set()
    for block in ast.walk(ast.parse(path.read_text())):
        for field in ("body", "orelse"):
            statements = getattr(block, field, None)
            if not isinstance(statements, list):
                continue
            for i, node in enumerate(statements):
                side = gpu_side(node.test) if isinstance(node, ast.If) else None
                if side is None:
                    continue
                gpu, cpu = (node.body, node.orelse) if side == "body" else \
                    (node.orelse, node.body)
                found |= lines_of(gpu)
                if cpu and isinstance(cpu[-1], ast.Return | ast.Raise):
                    found |= lines_of(statements[i + 1:])
    return found


def test_the_branch_scan_finds_the_gpu_side(tmp_path):
    source = ("def f(device, state):\n"
              "    if device.is_cpu:\n"
              "        return 1\n"
              "    gpu_after_return = 2\n"
              "    if state is not None and not device.is_cpu:\n"
              "        gpu_body = 3\n"
              "    if not device.is_cuda or state:\n"
              "        return 4\n"
              "    return 5\n")
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert device_branch_lines(path) == {4, 5, 6, 7, 8, 9}


@contextlib.contextmanager
def lines_run(paths: list[Path]):
    """The lines of `paths` that ran inside the block (this thread)."""
    wanted = {str(path) for path in paths}
    ran: dict[str, set[int]] = {name: set() for name in wanted}

    def local(frame, event, arg):
        if event == "line":
            ran[frame.f_code.co_filename].add(frame.f_lineno)
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename in wanted else None

    before = sys.gettrace()
    sys.settrace(calls)
    try:
        yield ran
    finally:
        sys.settrace(before)


ROOMS = [REPO / "megaloop" / "device.py", REPO / "megaloop" / "train" / "engine.py",
         REPO / "megaloop" / "train" / "trainer.py", REPO / "megaloop" / "train" / "mfu.py",
         REPO / "megaloop" / "train" / "checkpoint.py"]


def train_and_resume_on_one_gpu(monkeypatch, cfg):
    """A whole run and its resume from the last checkpoint, on the one-GPU machine."""
    with one_gpu_machine(monkeypatch) as (accelerator, name, pinned):
        trainer, summary, _ = run_trainer(cfg, device=CUDA_ON_THE_CPU)
        _, again, _ = run_trainer(cfg, device=CUDA_ON_THE_CPU, resume="auto")
    engine = trainer.engine
    assert summary["step"] == 4 and math.isfinite(summary["val/loss"])
    assert again["step"] == 4 and again["val/loss"] == pytest.approx(summary["val/loss"])
    assert engine.host_allocator == "CUDA" and engine.device == torch.device("cpu")
    for interval in summary["intervals"]:
        assert (interval["peak_mem_gib"], interval["peak_mem_reserved_gib"]) == (3.0, 5.0)
        assert 0 < interval["mfu_causal"] < interval["mfu"]
    accelerator.set_device.assert_called_with(0)
    accelerator.max_memory_allocated.assert_called_with(0)
    accelerator.max_memory_reserved.assert_called_with(0)
    accelerator.get_rng_state.assert_called_with(0)
    restored, index = accelerator.set_rng_state.call_args.args
    assert torch.equal(restored, accelerator.get_rng_state.return_value) and index == 0
    assert name.call_args == mock.call(0)
    assert len(pinned) >= 2 * 4  # tokens and targets of every training batch, then eval's
    return trainer, accelerator


def test_the_trainer_runs_every_cuda_branch_against_the_cuda_accelerator(
        monkeypatch, process_group, stdlib_shards, tmp_path):
    """Set-up, steps, MFU, evaluation, checkpoint and resume on a one-GPU machine, twice:
    ZeRO-0 with auto precision (the accelerator says bf16; the MFU peak is the H100's row of
    the table) and ZeRO-3 in fp32 (TF32 on; the peak a measured matmul rate). Memory is read
    allocated and reserved, the device's generator state goes into the checkpoint and comes
    back on resume, every batch is pinned; and every GPU-side line of the rooms that ask the
    device ran in one of the two."""
    settings = {"train.steps": 4, "train.log_interval": 2, "train.checkpoint_interval": 2}
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        with lines_run(ROOMS) as ran:
            auto = trainer_config(stdlib_shards, tmp_path / "auto", **settings,
                                  **{"train.precision": "auto"})
            trainer, accelerator = train_and_resume_on_one_gpu(monkeypatch, auto)
            accelerator.is_bf16_supported.assert_called()
            assert trainer.engine.precision == "bf16" and trainer.engine.autocast
            assert (trainer.peak, trainer.peak_source) == (989e12, f"table ({CARD})")
            fp32 = trainer_config(stdlib_shards, tmp_path / "fp32", **settings,
                                  **{"train.precision": "fp32", "train.zero_stage": 3})
            trainer, accelerator = train_and_resume_on_one_gpu(monkeypatch, fp32)
            assert trainer.engine.zero_stage == 3 and trainer.engine.matmul_precision == "tf32"
            assert trainer.peak_source == "measured matmul peak"
            accelerator.synchronize.assert_called_with(0)  # around each timed matmul
            test_the_device_asks_the_cuda_accelerator_with_the_arguments_it_takes(monkeypatch)
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    unrun = {}
    for path in ROOMS:
        missing = sorted(device_branch_lines(path) - ran[str(path)])
        if missing:
            unrun[str(path.relative_to(REPO))] = missing
    assert not unrun, unrun
    # the scan found the GPU side where it is: the lines that call these are among its lines
    device_py = REPO / "megaloop" / "device.py"
    lines = device_py.read_text().splitlines()
    for call in ("max_memory_reserved", "torch.cuda.get_device_name", "pin_memory()",
                 "is_bf16_supported", "set_rng_state(state", "set_device("):
        at = next(i for i, line in enumerate(lines, 1) if call in line)
        assert at in device_branch_lines(device_py), call


# ---- DeepSpeed's first import ------------------------------------------------------------------

FIRST_IMPORT = """
import sys, threading
{before}
from megaloop.device import Device
device = Device.of_this_process()
import deepspeed.autotuning.autotuner as autotuner
print(device.kind, 'mlflow' in sys.modules, autotuner.has_mlflow)
import mlflow  # megaloop's tracker can import it afterwards
print(mlflow.__name__)
"""


@pytest.mark.parametrize("before, expected", [
    ("", "cpu False False"),  # a rank without tracking: no MLflow in the process
    ("import mlflow", "cpu True True"),  # imported already: left as it is
    ("threading.Thread(target=threading.Event().wait, daemon=True).start()",
     "cpu True True"),  # another thread could be importing MLflow: nothing hidden
])
def test_deepspeeds_first_import_leaves_mlflow_out_and_stdout_alone(before, expected):
    # without DS_ACCELERATOR, DeepSpeed's import logs "Setting accelerator to CPU" to stdout
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, "-c", FIRST_IMPORT.format(before=before)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [expected, "mlflow"]  # DeepSpeed's log: on stderr
    assert "Setting accelerator to CPU" in result.stderr
