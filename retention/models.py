"""The values the engine takes and gives: events, ledger entries, decisions, outcomes."""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, NamedTuple

import attrs

from .errors import EventError, LineError
from .times import EARLIEST_TS, LATEST_TS, TimeFormatError, out_of_range, parse_instant


def pickled_as_tuple(cls: type) -> type:
    """Pickle an attrs class with slots as a plain tuple of its field values.

    attrs pickles slotted classes through a dict of names, rebuilt field by
    field: a stored customer snapshot holds many such objects, and the tuple
    form is about twice as fast both ways and smaller.
    """
    names = tuple(a.name for a in attrs.fields(cls))
    getter = operator.attrgetter(*names)
    setters = tuple(getattr(cls, name).__set__ for name in names)  # slot descriptors

    def __getstate__(self: Any) -> tuple[Any, ...]:
        return getter(self) if len(names) > 1 else (getter(self),)

    def __setstate__(self: Any, state: tuple[Any, ...]) -> None:
        for setter, value in zip(setters, state, strict=True):
            setter(self, value)

    cls.__getstate__ = __getstate__  # type: ignore[attr-defined]
    cls.__setstate__ = __setstate__  # type: ignore[attr-defined]
    return cls


#: Fields every event has; everything else in an event is a property.
CORE_FIELDS = ("id", "customer", "type", "at", "source")

#: CloudEvents carries the event time as ``time`` and properties under ``data``.
_CLOUDEVENT_KEYS = frozenset({"specversion", "time", "data", "datacontenttype", "subject"})

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def parse_json_line(text: str) -> Any:
    """One line of JSON input: the value it holds, or the LineError saying why it
    holds none (returned, not raised, so the line can be kept as a dead letter)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return LineError(f"invalid JSON: {exc.msg} (column {exc.colno})")
    except ValueError:  # a whole number beyond Python's digit limit
        return LineError(f"invalid JSON: a number of more than {_DIGIT_LIMIT} digits "
                         f"({_NUMBERS})")
    except RecursionError:
        return LineError("invalid JSON: nested too deeply")


# -- what an event may hold ---------------------------------------------------------

#: The largest magnitude of a number in an event: what a signed 64-bit integer
#: holds, so an id sent as a number fits, and sums and products of event numbers
#: stay far from what a float can count (1.8e308).
MAX_NUMBER = 2**63 - 1
#: the most characters of a text property, items of a list or object property (at
#: any depth), and characters of an event's id, customer, type or source: a
#: condition's work grows with the values it reads, and ids end up in headers
MAX_TEXT, MAX_ITEMS, MAX_NAME = 10_000, 1_000, 500
_NUMBERS = f"an event's numbers are at most {MAX_NUMBER:,} in magnitude"
_DIGIT_LIMIT = 4300  # Python's default limit on the digits of an integer read from text


def number_problem(value: int | float) -> str | None:
    """Why a number cannot be in an event (None: it can): NaN and the infinities are
    no JSON numbers (``1e400`` reads as infinity), and beyond ``MAX_NUMBER`` is too
    large to count with."""
    if -MAX_NUMBER <= value <= MAX_NUMBER:
        return None
    if value != value:
        return "NaN is not a number JSON can hold"
    if value in (math.inf, -math.inf):
        return ("an infinite number (or one too large for a float, such as 1e400) is not "
                "a number JSON can hold")
    return f"a number too large to count with ({_NUMBERS})"


def text_problem(text: str) -> str | None:
    """Why a string cannot be stored as text (None: it can): JSON can spell a lone
    UTF-16 surrogate (``\\ud800``), which is no character of any text."""
    surrogate = _lone_surrogate(text)
    return None if surrogate is None else f"a lone UTF-16 surrogate ({surrogate}) is not text"


def _lone_surrogate(text: str) -> str | None:
    """The first lone surrogate of ``text``, as JSON escapes it (None: there is none)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"
    return None


def unfit_property(props: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first property value (or name) an event cannot hold, as (where, why), or
    None. Nested lists and objects are looked through; other Python objects given
    through the API are left to the store, which keeps only JSON."""
    if _plain(props):
        return None
    for key, value in props.items():
        problem = _unfit_key(key) or _unfit_value(str(key), value)
        if problem is not None:
            return problem
    return None


def _plain(fields: Mapping[str, Any], _str: type = str, _float: type = float,
           _int: type = int, _bool: type = bool, _list: type = list, _dict: type = dict,
           _high: int = MAX_NUMBER, _low: int = -MAX_NUMBER, _long: int = MAX_TEXT) -> bool:
    """The common case, answered quickly: every value a text, a number in bounds, a
    boolean or null, and every name a text (True: nothing to look at further).

    (Every event passes here: the names it reads are bound as arguments, which
    Python looks up fastest.)"""
    for value in fields.values():
        kind = type(value)
        if kind is _str:
            if len(value) > _long:
                return False
            if value.isascii():
                continue
            try:
                value.encode("utf-8")
                continue
            except UnicodeEncodeError:
                return False
        elif kind is _float or kind is _int:
            if _low <= value <= _high:
                continue
        elif value is None or kind is _bool:
            continue
        elif (kind is _list or kind is _dict) and _unfit_value("", value) is None:
            continue  # (nested: looked through, each name too)
        return False
    try:
        names = "".join(fields)
    except TypeError:  # (a name that is not a string, given through the API)
        return False
    if names.isascii():
        return True
    try:
        names.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _unfit_key(key: object) -> tuple[str, str] | None:
    if type(key) is str and not key.isascii():
        surrogate = _lone_surrogate(key)
        if surrogate is not None:
            return _shown(key), \
                f"the field name holds a lone UTF-16 surrogate ({surrogate}), which is not text"
    return None


def _unfit_value(where: str, value: Any) -> tuple[str, str] | None:
    """``value`` and what it holds, looked through without recursion (however deep)
    and each container once (a structure given through the API may share or even
    hold itself)."""
    pending = [(where, value)]
    seen: set[int] = set()
    while pending:
        where, value = pending.pop()
        if isinstance(value, str):
            problem = text_problem(value) or (
                f"a text of {len(value):,} characters, more than {MAX_TEXT:,}"
                if len(value) > MAX_TEXT else None)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int | float):
            problem = number_problem(value)
        elif isinstance(value, Mapping | list | tuple):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if len(value) > MAX_ITEMS:
                return _shown(where), f"{len(value):,} items, more than {MAX_ITEMS:,}"
            if isinstance(value, Mapping):
                for key, inner in value.items():
                    bad_key = _unfit_key(key)
                    if bad_key is not None:
                        return f"{where}.{bad_key[0]}", bad_key[1]
                    pending.append((f"{where}.{key}", inner))
            else:
                pending.extend((f"{where}[{i}]", inner) for i, inner in enumerate(value))
            continue
        else:
            continue
        if problem is not None:
            return _shown(where), problem
    return None


def check_event(event: Event) -> None:
    """Raise EventError if ``event`` holds what the engine cannot work with: a time
    outside the supported range, a text that is not text, a number that is not a
    JSON number or too large to count with. Every way in (``Event.from_dict``,
    ``Engine.process`` given an Event) checks this."""
    if not EARLIEST_TS <= event.ts < LATEST_TS:
        raise EventError(f"field 'at': {out_of_range(event.at)}", field="at",
                         event_id=_shown(event.id))
    for field in ("id", "customer", "type", "source"):
        value = getattr(event, field)
        problem = (text_problem(value) or (
            f"{len(value):,} characters, more than {MAX_NAME}" if len(value) > MAX_NAME
            else None)) if isinstance(value, str) else None
        if problem is not None:
            raise EventError(f"field {field!r}: {problem}", field=field,
                             event_id=_shown(event.id))
    unfit = unfit_property(event.props)
    if unfit is not None:
        where, problem = unfit
        raise EventError(f"field '{where}': {problem}", field=where.split(".")[0],
                         event_id=_shown(event.id))


def _shown(text: object) -> str:
    """``text`` as a message may show it (a lone surrogate written as its escape)."""
    text = str(text)
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def source_of(raw: Mapping[str, Any], default: str = "") -> str:
    """The source an event mapping names, or ``default``, as the event will carry it."""
    src = raw.get("source") or default
    if isinstance(src, int) and not isinstance(src, bool) and number_problem(src):
        return ""  # (the event is refused: no source to name it by)
    try:
        return str(src) if src else ""
    except ValueError:  # (a value holding a number of more digits than Python writes)
        return ""


def id_of(raw: Mapping[str, Any]) -> str | None:
    """The id an event mapping gives, as the event will carry it; None if unusable."""
    try:
        return _text(raw, "id", None)
    except EventError:
        return None


def _text(raw: Mapping[str, Any], field: str, event_id: object) -> str:
    value = raw.get(field)
    if value is None or value == "":
        raise EventError(f"missing field {field!r}", field=field, event_id=event_id)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EventError(
            f"field {field!r} must be a string, got {type(value).__name__}",
            field=field,
            event_id=_shown_id(event_id),
        )
    if isinstance(value, int):
        if number_problem(value) is not None:
            raise EventError(f"field {field!r}: {number_problem(value)}", field=field,
                             event_id=None if field == "id" else _shown_id(event_id))
        return str(value)
    return value


def _shown_id(event_id: object) -> object:
    """An event id as a message may show it: a lone surrogate as its escape, a whole
    number too large to write as itself not at all."""
    if isinstance(event_id, str):
        return _shown(event_id)
    if isinstance(event_id, int) and not isinstance(event_id, bool) \
            and number_problem(event_id) is not None:
        return None
    return event_id


@attrs.frozen(kw_only=True, slots=True)
class Event:
    """One fact about one customer at one moment.

    ``ts`` is ``at`` as seconds since the epoch; ``props`` holds every other field
    (``amount``, ``delay_days``, ``ticket_id``...).
    """

    id: str
    customer: str
    type: str
    at: datetime
    source: str = ""
    props: Mapping[str, Any] = attrs.field(default=_EMPTY)
    ts: float = attrs.field(init=False)

    @ts.default
    def _ts(self) -> float:
        return self.at.timestamp()

    def __attrs_post_init__(self) -> None:
        if self.at.tzinfo is None or self.at.utcoffset() is None:
            raise EventError("field 'at' has no time zone", field="at", event_id=self.id)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "") -> Event:
        """Validate a plain mapping (JSON object) into an event.

        Accepts the canonical form (``id``, ``customer``, ``type``, ``at``) and the
        CloudEvents envelope (``time`` for ``at``, properties under ``data``, the
        customer as ``subject`` or ``data.customer``).
        """
        if type(raw) is dict and "specversion" not in raw:
            fast = _checked(raw, source)
            if fast is not None:
                return fast
        if isinstance(raw, Event):
            check_event(raw)
            return raw
        if not isinstance(raw, Mapping):
            raise EventError(f"expected a JSON object, got {type(raw).__name__}")
        if "specversion" in raw:
            raw = _from_cloudevent(raw)
        event_id = raw.get("id")
        event_id = _text(raw, "id", event_id)
        customer = _text(raw, "customer", event_id)
        kind = _text(raw, "type", event_id)
        if raw.get("at") in (None, ""):
            raise EventError("missing field 'at'", field="at", event_id=event_id)
        try:
            at = parse_instant(raw["at"])
        except TimeFormatError as exc:
            raise EventError(f"field 'at': {exc}", field="at", event_id=event_id) from None
        given = raw.get("source")
        if isinstance(given, int) and not isinstance(given, bool) and number_problem(given):
            raise EventError(f"field 'source': {number_problem(given)}", field="source",
                             event_id=event_id)
        props = {k: v for k, v in raw.items() if k not in CORE_FIELDS}
        event = cls(
            id=event_id,
            customer=customer,
            type=kind,
            at=at,
            source=source_of(raw, source),
            props=props,
        )
        check_event(event)
        return event

    def get(self, field: str, default: Any = None) -> Any:
        if field in CORE_FIELDS:
            return getattr(self, field)
        return self.props.get(field, default)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "customer": self.customer,
            "type": self.type,
            "at": self.at.isoformat(),
        }
        if self.source:
            out["source"] = self.source
        out.update(self.props)
        return out


_new_event = object.__new__
# the slot descriptors of Event: setting through them skips the attribute lookup
_set_id, _set_customer, _set_type, _set_at, _set_source, _set_props, _set_ts = (
    getattr(Event, name).__set__
    for name in ("id", "customer", "type", "at", "source", "props", "ts"))


def _checked(raw: dict[str, Any], source: str) -> Event | None:
    """The common case, checked quickly: string id, customer, type and an ISO time
    with a zone. Anything else returns None and takes the full path, which names
    the problem precisely."""
    event_id, customer, kind, when = raw.get("id"), raw.get("customer"), raw.get("type"), \
        raw.get("at")
    if not (type(event_id) is str and event_id and type(customer) is str and customer
            and type(kind) is str and kind and type(when) is str
            and len(event_id) <= MAX_NAME and len(customer) <= MAX_NAME
            and len(kind) <= MAX_NAME):
        return None
    try:
        at = datetime.fromisoformat(when)
    except ValueError:
        return None
    if at.tzinfo is None:
        return None
    src = raw.get("source") or source
    if type(src) is not str or len(src) > MAX_NAME:
        return None
    ts = at.timestamp()
    # in the range, and every field (the event's own and its properties) plain
    if not (EARLIEST_TS <= ts < LATEST_TS and _plain(raw)
            and (src.isascii() or text_problem(src) is None)):
        return None
    props = raw.copy()
    del props["id"], props["customer"], props["type"], props["at"]
    props.pop("source", None)
    event = _new_event(Event)
    # the same fields Event.__init__ would set, already checked above
    _set_id(event, event_id)
    _set_customer(event, customer)
    _set_type(event, kind)
    _set_at(event, at)
    _set_source(event, src)
    _set_props(event, props)
    _set_ts(event, ts)
    return event


def _from_cloudevent(raw: Mapping[str, Any]) -> dict[str, Any]:
    data = raw.get("data")
    if data is not None and not isinstance(data, Mapping):
        raise EventError("CloudEvents 'data' must be a JSON object", field="data",
                         event_id=raw.get("id"))
    out: dict[str, Any] = dict(data or {})
    for key, value in raw.items():
        if key not in _CLOUDEVENT_KEYS and not key.startswith("ce_"):
            out.setdefault(key, value)
    out["id"] = raw.get("id")
    out["type"] = raw.get("type")
    out["source"] = raw.get("source")
    out.setdefault("at", raw.get("time"))
    if raw.get("subject") and not out.get("customer"):
        out["customer"] = raw["subject"]
    return out


class LedgerEntry(NamedTuple):
    """A movement of capital, with the rule that caused it and a readable reason.

    An immutable named tuple rather than an attrs class: a customer's ledger grows
    with every event, and tuples of plain values cost the garbage collector nothing.
    """

    customer: str
    rule: str
    points: float
    at: datetime
    event_id: str | None
    category: str
    reason: str
    #: False for what time did up to a moment that no event has settled yet (see
    #: ``Engine.explain(customer, at=...)``); the stored ledger holds only settled ones
    settled: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = self._asdict()
        out["at"] = self.at.isoformat()
        return out


#: Decision statuses of the engine; delivery adds ``sent`` and ``failed``.
PENDING, SUPPRESSED, HELD_OUT = "pending", "suppressed", "held_out"


@pickled_as_tuple
@attrs.frozen(kw_only=True, slots=True)
class Decision:
    """An action the engine decided, with a deterministic id.

    ``rule`` is the level, recognition or rule name that caused it; ``trigger``
    is the event id, or the crossing time for a decision that time caused.
    """

    id: str
    customer: str
    rule: str
    action: str
    params: Mapping[str, Any]
    at: datetime
    kind: str
    via: str | None
    trigger: str
    status: str = PENDING
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "customer": self.customer,
            "rule": self.rule,
            "action": self.action,
            "params": dict(self.params),
            "at": self.at.isoformat(),
            "kind": self.kind,
            "via": self.via,
            "trigger": self.trigger,
            "status": self.status,
            "reason": self.reason,
        }


@attrs.frozen(kw_only=True, slots=True)
class Outcome:
    """What processing one event did.

    ``capital_before``/``capital_after`` are None while the customer is a prospect;
    ``duplicate`` is True when the event id was already known (nothing changed).
    """

    event: Event
    capital_before: float | None
    capital_after: float | None
    ledger: tuple[LedgerEntry, ...] = ()
    decisions: tuple[Decision, ...] = ()
    duplicate: bool = False
