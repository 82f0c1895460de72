"""Shared fixtures: factories of tiny model configs and tiny models (see tiny.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tiny import make_config, make_model

from megaloop.config import ModelConfig
from megaloop.model import LoopedLM


@pytest.fixture
def tiny_config() -> Callable[..., ModelConfig]:
    return make_config


@pytest.fixture
def tiny_model() -> Callable[..., LoopedLM]:
    return make_model
