"""One rank of a two-rank check (tests/train/test_engine.py runs it under torchrun): after one
micro-batch per rank in bf16, the engine's reduced gradient of a Linear weight of the loop block
against the fp64 sum of both ranks' gradients, computed here by a plain model. Prints the
relative error (rank 0) as JSON.

    python -m torch.distributed.run --standalone --nproc-per-node=2 \
        tests/two_rank_gradients.py STAGE
"""

from __future__ import annotations

import json
import sys

import torch
from tiny import random_tokens

from megaloop import config
from megaloop.model import LoopedLM
from megaloop.train.engine import Engine

SETTINGS = {"model.vocab_size": 64, "model.d_model": 64, "model.n_heads": 4,
            "model.prelude_layers": 1, "model.loop_layers": 1, "model.coda_layers": 1,
            "model.recurrences": 2, "model.max_seq_len": 64, "train.micro_batch": 1,
            "train.global_batch": 2, "train.steps": 1, "train.grad_clip": 0.0,
            "train.precision": "bf16"}


def reduced_gradient(engine: Engine, param: torch.nn.Parameter) -> torch.Tensor:
    if engine.zero_stage == 0:
        return param.grad.double()
    from deepspeed.utils import safe_get_full_grad

    return safe_get_full_grad(param).double()


def main() -> None:
    stage = int(sys.argv[1])
    cfg = config.load(None, [f"{key}={value}" for key, value in
                             {**SETTINGS, "train.zero_stage": stage}.items()])
    tokens = random_tokens(batch=2, seq=65, vocab=64)  # the same on both ranks (seeded)
    engine = Engine(cfg).build()
    try:
        weights = engine.consolidated_state_dict()
        rank = engine.rank
        engine.forward_backward(tokens[rank:rank + 1, :-1], tokens[rank:rank + 1, 1:], 2)
        got = reduced_gradient(engine, engine.model.loop[0].mlp.inp.weight)
    finally:
        engine.close()
    reference = LoopedLM(cfg.model)
    reference.load_state_dict(weights)
    for i in range(2):
        with torch.autocast("cpu", torch.bfloat16, cache_enabled=False):
            loss = reference(tokens[i:i + 1, :-1], tokens[i:i + 1, 1:])
        (loss / 2).backward()  # accumulates in fp32, as the ranks' reduction must
    want = reference.loop[0].mlp.inp.weight.grad.double()
    if rank == 0:
        print(json.dumps({"relative_error": ((got - want).norm() / want.norm()).item()}))


if __name__ == "__main__":
    main()
