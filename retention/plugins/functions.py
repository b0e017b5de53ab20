"""Built-in plugin: the functions every rule-file condition may call."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl


def lower(value: Any) -> Any:
    return value.lower()


def upper(value: Any) -> Any:
    return value.upper()


@hookimpl
def register_functions(register: Any) -> None:
    for name, function in (("abs", abs), ("len", len), ("lower", lower), ("max", max),
                           ("min", min), ("round", round), ("upper", upper)):
        register(name, function)
