"""What every adapter does the same way: who the customer is, the ``identify`` that
links a platform's own id to them, checking signatures, and reading platforms'
payloads into canonical events with one clear reason when they are not what the
platform sends.

Identity (docs/adapters.md, "One customer across platforms"): a customer is
``email:`` + the lower-cased address whenever the payload has one, else the
platform's own id (``shopify:123``); each adapter also sends an ``identify`` linking
that id to the address, so one person's events from every platform land on one
customer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from retention import signing
from retention.signing import SignatureError
from retention.webevents import BodyError, Ignored, loads

__all__ = ["BodyError", "Ignored", "SignatureError", "alias", "amount", "body_object",
           "customer", "decision_text", "email_of", "field", "hmac_base64", "identify",
           "instant", "same", "signed_recently", "text"]

#: the longest text kept from a platform's free text (a ticket's description...)
MAX_TEXT = 4000
#: an address as the engine keys customers on it: ASCII (a lookalike letter such as
#: the Kelvin sign lower-cases to another person's "k"), no spaces, control
#: characters, angle brackets, quotes, separators or URL delimiters (it ends up in
#: email headers, API queries and event ids), one @
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$&'*+=^_`{|}~-]+@[A-Za-z0-9.-]+\.[A-Za-z0-9-]+")


#: a platform's id of a person
_PLATFORM_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")


def email_of(value: Any) -> str | None:
    """A payload's email address, lower-cased, or None when it holds none (absent,
    empty, or not an address: a value that is not one never becomes a customer)."""
    if not isinstance(value, str):
        return None
    value = value.strip()  # (checked before lower-casing: "\u212a".lower() is "k")
    return value.lower() if len(value) <= 254 and _ADDRESS.fullmatch(value) else None


def alias(platform: str, platform_id: Any) -> str:
    """The platform's own id of a person, ``shopify:123``."""
    if isinstance(platform_id, bool) or not isinstance(platform_id, (str, int)):
        raise BodyError(f"{platform}: a customer id must be a string or a number, "
                        f"got {type(platform_id).__name__}")
    value = str(platform_id).strip()
    # (it goes into API paths of the platform's sink: letters, digits, . _ - only)
    if not _PLATFORM_ID.fullmatch(value) or value.strip(".") == "":
        raise BodyError(f"{platform}: unusable customer id {value[:40]!r}")
    return f"{platform}:{value}"


def customer(platform: str, email: Any = None, platform_id: Any = None) -> str:
    """The customer an event is about: ``email:`` + the address when there is one,
    else the platform's id. BodyError when the payload names neither."""
    address = email_of(email)
    if address is not None:
        return "email:" + address
    if platform_id is None or platform_id == "":
        raise BodyError(f"{platform}: the payload names no customer (no email, no id)")
    return alias(platform, platform_id)


def identify(platform: str, email: Any, platform_id: Any) -> list[dict[str, Any]]:
    """The ``identify`` linking a platform's id to an address (none when the payload
    lacks either)."""
    address = email_of(email)
    if address is None or platform_id is None or platform_id == "":
        return []
    return [{"type": "identify", "customer": "email:" + address,
             "aliases": [alias(platform, platform_id)], "move_aliases": False}]


# -- signatures -------------------------------------------------------------------------

def hmac_base64(key: bytes, message: bytes, digest: str = "sha256") -> str:
    """The base64 of an HMAC, as most platforms send it."""
    return base64.b64encode(hmac.new(key, message, getattr(hashlib, digest)).digest()
                            ).decode()


def same(expected: str, given: str | None, what: str) -> None:
    """Raise SignatureError unless ``given`` is ``expected`` (constant time)."""
    if not given:
        raise SignatureError(f"no {what}")
    if not hmac.compare_digest(expected.encode(), given.strip().encode()):
        raise SignatureError(f"wrong {what}")


def signed_recently(stamp: str | None, now: float, what: str, *, millis: bool = False
                    ) -> float:
    """The seconds of a signed timestamp (plain digits, in milliseconds with
    ``millis``), refused more than ``retention.signing.TOLERANCE`` away from ``now``."""
    if not stamp or not (stamp.strip().isascii() and stamp.strip().isdigit()) or len(
            stamp.strip()) > 16:
        raise SignatureError(f"no {what}, or not plain digits")
    seconds = int(stamp.strip()) / (1000 if millis else 1)
    if abs(now - seconds) > signing.TOLERANCE:
        raise SignatureError(f"the {what} is more than {signing.TOLERANCE / 60:g} minutes "
                             "away: a replay, or a clock to set")
    return seconds


# -- reading payloads -------------------------------------------------------------------

def body_object(body: bytes, platform: str) -> Any:
    """The JSON of a body (BodyError with the reason when it is not JSON)."""
    try:
        return loads(body)
    except BodyError as exc:
        raise BodyError(f"{platform}: {exc}") from None


def field(payload: Any, *path: str | int, platform: str, kind: type | tuple[type, ...] = object,
          required: bool = True) -> Any:
    """``payload[path[0]][path[1]]...``, checked to be of ``kind``; BodyError naming the
    path when it is absent (and ``required``) or of another type, None when absent and
    not required."""
    value = payload
    for step in path:
        inside = (isinstance(value, Mapping) and isinstance(step, str) and step in value) or (
            isinstance(value, list) and isinstance(step, int) and -len(value) <= step < len(value))
        if not inside or value[step] is None:  # type: ignore[index]
            if required:
                raise BodyError(f"{platform}: the payload has no {_dotted(path)}")
            return None
        value = value[step]  # type: ignore[index]
    if kind is not object and (not isinstance(value, kind) or (
            isinstance(value, bool) and bool not in _kinds(kind))):
        raise BodyError(f"{platform}: {_dotted(path)} is {type(value).__name__}, "
                        f"not {_kind_names(kind)}")
    return value


def amount(value: Any, platform: str, what: str) -> float:
    """A money amount as platforms send it (a number, or a decimal string "12.50")."""
    if isinstance(value, bool):
        raise BodyError(f"{platform}: {what} is not an amount: {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BodyError(f"{platform}: {what} is not an amount: {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise BodyError(f"{platform}: {what} is not a finite amount")
    return number


def instant(value: Any, platform: str, what: str) -> str:
    """A platform's time as an ISO-8601 instant with its time zone (a string with an
    offset, or seconds since the epoch); BodyError when it has no time zone."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or not 0 <= value < 1e11:
            raise BodyError(f"{platform}: {what} is not a time: {value!r}")
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="milliseconds")
    if not isinstance(value, str) or len(value) > 64:
        raise BodyError(f"{platform}: {what} is not a time: {str(value)[:40]!r}")
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BodyError(f"{platform}: {what} is not an ISO-8601 time: {value[:40]!r}"
                        ) from None
    if moment.tzinfo is None:
        raise BodyError(f"{platform}: {what} has no time zone: {value!r}")
    return moment.isoformat()


def text(value: Any, limit: int = MAX_TEXT) -> str | None:
    """Free text from a payload, cut to ``limit`` characters (None when absent)."""
    if value is None:
        return None
    return (value if isinstance(value, str) else json.dumps(value))[:limit]


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path) or "body"


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_names(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "text", int: "a number",
             float: "a number", bool: "true or false"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in _kinds(kind)))


# -- sinks --------------------------------------------------------------------------------

def decision_text(delivery: Any) -> str:
    """What a task or ticket made for a decision says: the action, the customer, why and
    when, its parameters, and the decision id (the idempotency key, for a person
    reading it)."""
    decision = delivery.decision
    lines = [f"The retention engine decided {decision.action} for customer "
             f"{decision.customer} ({decision.rule}, {decision.at.isoformat()})."]
    if decision.params:
        lines.append("Parameters: " + ", ".join(f"{k}={v}" for k, v in
                                                sorted(decision.params.items())))
    lines.append(f"Decision {delivery.key}")
    return "\n".join(lines)
