"""Jinja for the files users share (sweep specs, DeepSpeed config templates): always the
sandbox, so a shared file is data and never code, and one clear error for anything a render
raises."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.nativetypes import NativeEnvironment
from jinja2.sandbox import SandboxedEnvironment

from megaloop.errors import ConfigError

T = TypeVar("T")


class SandboxedNativeEnvironment(SandboxedEnvironment, NativeEnvironment):
    """The sandbox (no attribute of Python's internals, no unsafe call) rendering to native
    types (`{{ 2 ** 20 }}` is an int)."""


def render_or_refuse(render: Callable[[], T], what: str) -> T:
    """`render()`, or a ConfigError that names `what` (the template or the value) and why:
    a reach outside the sandbox, or an expression that fails."""
    try:
        return render()
    except SecurityError as exc:
        raise ConfigError(f"{what} reaches outside the template sandbox ({exc}); a template "
                          "may compute with its variables only.") from None
    except (jinja2.TemplateError, ArithmeticError, TypeError, ValueError) as exc:
        raise ConfigError(f"{what} does not render: {type(exc).__name__}: {exc}. Fix the "
                          "expression.") from None
