"""The values the engine takes and gives: events, ledger entries, decisions, outcomes."""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, NamedTuple

import attrs

from .errors import EventError, LineError
from .times import TimeFormatError, parse_instant


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
    except ValueError as exc:  # a number beyond Python's digit limit
        return LineError(f"invalid JSON: {exc}")
    except RecursionError:
        return LineError("invalid JSON: nested too deeply")


def source_of(raw: Mapping[str, Any], default: str = "") -> str:
    """The source an event mapping names, or ``default``, as the event will carry it."""
    src = raw.get("source") or default
    return str(src) if src else ""


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
            event_id=event_id,
        )
    return str(value)


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
        props = {k: v for k, v in raw.items() if k not in CORE_FIELDS}
        return cls(
            id=event_id,
            customer=customer,
            type=kind,
            at=at,
            source=source_of(raw, source),
            props=props,
        )

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
            and type(kind) is str and kind and type(when) is str):
        return None
    try:
        at = datetime.fromisoformat(when)
    except ValueError:
        return None
    if at.tzinfo is None:
        return None
    src = raw.get("source") or source
    if type(src) is not str:
        return None
    event = _new_event(Event)
    # the same fields Event.__init__ would set, already checked above
    _set_id(event, event_id)
    _set_customer(event, customer)
    _set_type(event, kind)
    _set_at(event, at)
    _set_source(event, src)
    props = raw.copy()
    del props["id"], props["customer"], props["type"], props["at"]
    props.pop("source", None)
    _set_props(event, props)
    _set_ts(event, at.timestamp())
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
