"""Built-in plugin: the ``python`` matcher, the safe expression language of the rule
files compiled once to plain Python."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from ..rules.expressions import compile_condition


@hookimpl
def register_matchers(register: Any) -> None:
    register("python", compile_condition)
