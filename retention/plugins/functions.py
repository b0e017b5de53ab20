"""Built-in plugin: the functions every rule-file condition may call.

Their arguments come from events, so from anyone who can send one: each function
does work bounded by the size of its arguments, whatever their values. A value a
function refuses raises ValueError or TypeError with the reason, and the condition
reads the call as missing (false), as it does any failed call.
"""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl

#: ``round``'s digits: past these a float is already exact or zero, and for a whole
#: number ``round(n, -10_000_000_000)`` would build ten to that power first.
MAX_DIGITS = 308


def _number(name: str, value: Any) -> None:
    if type(value) not in (int, float):
        raise TypeError(f"{name} takes a number, got {type(value).__name__}")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} takes text, got {type(value).__name__}")


def lower(value: Any) -> Any:
    _text("lower", value)
    return value.lower()


def upper(value: Any) -> Any:
    _text("upper", value)
    return value.upper()


def round_(number: Any, digits: Any = None) -> Any:
    """Python's ``round``, on numbers only, with ``digits`` within +-MAX_DIGITS."""
    _number("round", number)
    if digits is None:
        return round(number)
    if type(digits) is not int or not -MAX_DIGITS <= digits <= MAX_DIGITS:
        raise ValueError(f"round: digits must be a whole number from -{MAX_DIGITS} to "
                         f"{MAX_DIGITS}, got {digits!r}")
    return round(number, digits)


@hookimpl
def register_functions(register: Any) -> None:
    for name, function in (("abs", abs), ("len", len), ("lower", lower), ("max", max),
                           ("min", min), ("round", round_), ("upper", upper)):
        register(name, function)
