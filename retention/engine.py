"""Processing: events in, capital, ledger and decisions out (docs/concepts.md,
"Processing one event" to "Decisions: pressure, consent, holdout").

The engine holds, per customer, the settled capital state and the bookkeeping the
rules need (repeat windows, recoverable incidents, recognition counters, the
contact-pressure window, consent). Everything is derived from the customer's
events in time order, so an event that arrives late recomputes that customer
from their events, and the result is the same as if it had come in order.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import heapq
import itertools
import json
import marshal
import math
import pickle
import struct
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs

from .capital import (
    FIRE,
    Penalty,
    PenaltyRow,
    capital_at,
    clamp,
    fading_penalty,
    level_transitions,
    next_level_change,
    remaining,
    settle,
    tie,
    unsettled,
)
from .errors import EventError
from .models import (
    HELD_OUT,
    PENDING,
    SUPPRESSED,
    Decision,
    Event,
    LedgerEntry,
    Outcome,
    check_event,
    pickled_as_tuple,
)
from .rules.loader import load_rules
from .rules.model import ActionRef, RuleSet
from .times import (
    DAY,
    TimeFormatError,
    fixed_offset,
    format_instant,
    from_micros,
    from_seconds,
    parse_instant,
    to_micros,
)

if TYPE_CHECKING:
    from .store import StoredEngine

PURCHASE = "purchase"

#: repeat escalation stops growing here: far beyond any capital range, yet finite
_MAX_MULTIPLIER = 1e12
_MAX_POINTS = 1e15
_INF = math.inf


def decision_id(customer: str, cause: str, trigger: str, action: str) -> str:
    """The id of a decision: a pure function of who, why, what caused it, and the action."""
    key = "\x1f".join((customer, cause, trigger, action)).encode()
    return hashlib.blake2b(key, digest_size=12).hexdigest()


def in_holdout(customer: str, level: str, share: float) -> bool:
    """Whether a customer is in the control group of a level (a stable hash, not chance)."""
    if share <= 0:
        return False
    digest = hashlib.blake2b(f"{customer}\x1f{level}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < share


#: event types whose plan is kept (more distinct types than this are planned anew)
_MAX_PLANS = 4096


class _TypePlan(NamedTuple):
    """What processing an event of one type needs from the rules."""

    rules: tuple[Any, ...]
    rewards: tuple[Any, ...]
    #: consent after such an event: True (given), False (withdrawn), None (unchanged)
    consent: bool | None
    #: whether it counts as a contact that ends a silence
    contact: bool
    opens: bool
    #: whether a condition it meets reads ``customer.*`` (and ``customer.level``)
    view: bool
    level: bool


class Taken(NamedTuple):
    """Points a recoverable rule took, kept until a recovery or its window passes.

    A customer keeps it as a plain tuple (see ``Customer.taken``)."""

    at: float
    #: the fading penalty it took, as it was then (None: permanent points)
    penalty: PenaltyRow | None
    permanent: float
    recovered: bool = False
    #: the event that took the points, with its source if any: what ties together
    #: the recoveries of one incident through different fields (None: kept before)
    event: str | None = None


@pickled_as_tuple
@attrs.define(slots=True)
class _Taken:
    """A taken incident as snapshots pickled it before it was a plain tuple (kept so
    that those snapshots still load)."""

    at: float
    penalty: Penalty | None
    permanent: float
    recovered: bool = False

    def row(self) -> tuple[Any, ...]:
        return (self.at, None if self.penalty is None else self.penalty.row(),
                self.permanent, self.recovered)


@attrs.define(slots=True)
class CustomerView:
    """``customer.*`` in a condition: the customer just before the event."""

    capital: float | None
    level: str | None
    purchases: int
    spent: float
    days_since_contact: float | None
    consent: bool


@pickled_as_tuple
@attrs.define(slots=True, eq=False)
class Customer:
    """One customer's state in the engine."""

    id: str
    #: the customer's events, packed (see ``_pack``), in the order they were applied
    log: bytearray = attrs.Factory(bytearray)
    #: (time, id, source) of the latest event applied; None before the first
    last: tuple[float, str, str] | None = None
    # The settled capital (see ``capital.Capital``), held by the customer itself:
    # one object per customer for the cycle collector to walk, not two.
    #: when the relationship opened; None while the customer is a prospect
    opened_at: float | None = None
    balance: float = 0.0
    last_contact: float = 0.0
    clean_since: float = 0.0
    steps: int = 0
    penalties: tuple[PenaltyRow, ...] = ()
    armed: bytearray = attrs.Factory(bytearray)
    fired: bytearray = attrs.Factory(bytearray)
    level_time: float = -math.inf
    horizon: float = -math.inf
    purchases: int = 0
    spent: float = 0.0
    consent: bool = True
    # Bookkeeping the rules need, created on first use (most customers need little).
    # Kept in what Python's cycle collector does not track (numbers packed in a
    # bytearray, changed in place; tuples of plain values): it would otherwise walk
    # every customer's bookkeeping at each full collection, which for a million
    # customers costs more than the events. (See ``_trim`` for the windows.)
    counts: dict[str, int] | None = None
    #: the `after` rewards granted
    rewarded: tuple[str, ...] | None = None
    #: purchases counted by each `after` reward: time, amount, time, amount...
    windows: dict[str, bytearray] | None = None
    #: times of the matches of each repeat rule
    repeats: dict[str, bytearray] | None = None
    #: incidents a recovery may still refund, as the plain tuple of a ``Taken``
    taken: dict[tuple[str, Any], tuple[Any, ...]] | None = None
    #: times of the decisions that count against the contact pressure
    pressure: bytearray | None = None
    #: decisions by id, created with the first one, as bytes (see ``pack_decision``)
    decisions: dict[str, bytes] | None = None
    next_change: float = math.inf
    #: the time of this customer's live entry in the tick queue
    scheduled: float = math.inf
    levels_due: float = math.inf
    #: the schedule may now be too late: points were taken or a level moved since it
    #: was computed (points given only make what it foresaw come later)
    dirty: bool = False
    #: levels cannot move while capital stays in [calm_low, calm_high)
    calm_low: float = -math.inf
    calm_high: float = math.inf

    def level(self, rules: RuleSet) -> str | None:
        """The lowest level that fired and has not re-armed, or None."""
        lowest = None
        for level, fired in zip(rules.levels, self.fired, strict=False):
            if fired and (lowest is None or level.below < lowest.below):
                lowest = level
        return lowest.name if lowest else None


#: fields of a customer pickled before it held its capital itself (then a
#: CapitalState, or None, fourth)
_EARLIER_FIELDS = 24
_set_customer = Customer.__setstate__  # type: ignore[attr-defined]


def _customer_from(self: Customer, values: tuple[Any, ...]) -> None:
    if len(values) == _EARLIER_FIELDS:
        capital = values[3]
        own = (None, 0.0, 0.0, 0.0, 0, ()) if capital is None else (
            capital.opened_at, capital.balance, capital.last_contact, capital.clean_since,
            capital.steps, capital.penalties)
        values = (*values[:3], *own, *values[4:])
    penalties, taken = values[8], values[20]
    # penalties and taken incidents pickled as objects before they were plain tuples
    if penalties and not isinstance(penalties[0], tuple):
        values = (*values[:8], tuple(p.row() for p in penalties), *values[9:])
    if taken and any(isinstance(t, _Taken) for t in taken.values()):
        values = (*values[:20], {k: t.row() if isinstance(t, _Taken) else t
                                 for k, t in taken.items()}, *values[21:])
    _set_customer(self, values)


Customer.__setstate__ = _customer_from  # type: ignore[attr-defined]


_new = object.__new__
_OUTCOME_SLOTS = tuple(getattr(Outcome, name).__set__ for name in (
    "event", "capital_before", "capital_after", "ledger", "decisions", "duplicate"))


def _outcome(event: Event, before: float | None, after: float | None,
             ledger: tuple[LedgerEntry, ...], decisions: tuple[Decision, ...]) -> Outcome:
    """The outcome of an event that was applied, set through the slot descriptors (the
    keyword call of a frozen class costs a tenth of an event's processing)."""
    out = _new(Outcome)
    s_event, s_before, s_after, s_ledger, s_decisions, s_duplicate = _OUTCOME_SLOTS
    s_event(out, event)
    s_before(out, before)
    s_after(out, after)
    s_ledger(out, ledger)
    s_decisions(out, decisions)
    s_duplicate(out, False)
    return out


#: a ledger entry from the tuple of its fields in order, without the keyword call
_entry = functools.partial(tuple.__new__, LedgerEntry)


def fading_entry(customer: str, penalty: PenaltyRow, points: float, at: datetime,
                 event_id: str | None, *, settled: bool = True) -> LedgerEntry:
    """The points the fading of a penalty's trace gave back: the ledger took all of
    them when the incident happened, capital only what is still remembered."""
    taken, t0, _, keep, rule = penalty[:5]
    what = f"{rule} of {from_seconds(t0).date()} ({-taken:.2f} points)"
    if not settled:
        how = "faded since, not settled"
    elif keep > 0:
        how = f"faded to its floor, {keep:.0%} kept for good"
    else:
        how = "faded"
    return LedgerEntry(customer=customer, rule=rule, points=points, at=at, event_id=event_id,
                       category="fading", reason=f"{what}: {how}, {points:+.2f} given back",
                       settled=settled)


def unsettled_entries(c: Customer, rules: RuleSet, t: float, at: datetime
                      ) -> list[LedgerEntry]:
    """What time did to ``c`` up to ``t`` that no event has settled yet, as ledger
    entries marked as not settled: with the settled ledger they add up to the
    capital at ``t``."""
    owed, steps, drain, faded, cut = unsettled(c, rules, t)
    entries = []
    if owed:
        entries.append(LedgerEntry(
            customer=c.id, rule="licence", points=owed, at=at, event_id=None,
            category="licence", settled=False,
            reason=f"points licence: clean since {format_instant(c.clean_since)}, "
                   f"{steps - c.steps} step(s), not settled"))
    if drain:
        entries.append(LedgerEntry(
            customer=c.id, rule="silence", points=-drain, at=at, event_id=None,
            category="silence", settled=False,
            reason=f"silence: {(t - c.last_contact) / DAY:.1f} days without contact, "
                   "not settled"))
    entries.extend(fading_entry(c.id, penalty, points, at, None, settled=False)
                   for penalty, points in faded if points)
    if cut:
        cap = rules.capital
        entries.append(LedgerEntry(
            customer=c.id, rule="bounds", points=cut, at=at, event_id=None,
            category="bounds", settled=False,
            reason=f"capital stays within [{cap.min:g}, {cap.max:g}]: {cut:+.2f} to stay at "
                   f"{cap.min if cut > 0 else cap.max:g}, not settled"))
    return entries


_decision_state = Decision.__setstate__  # type: ignore[attr-defined]
_MARSHALLED_DECISION, _PICKLED_DECISION = b"M", b"P"


def pack_decision(d: Decision) -> bytes:
    """A decision as a customer keeps it: bytes.

    Bytes are not tracked by Python's cycle collector, while an object, or a new
    tuple put in a dict, is, and makes the dict tracked again: a million decisions
    kept as objects would be walked at every full collection. The marshal form is
    the fields in order with the time as microseconds and a UTC offset (the form of
    the store's snapshots since the start); a decision marshal cannot hold (a time
    zone with rules, an unusual parameter given through the API) is pickled.
    """
    at = d.at
    offset = fixed_offset(at)
    if offset is not None:
        try:
            return _MARSHALLED_DECISION + marshal.dumps((
                d.id, d.customer, d.rule, d.action, dict(d.params),
                to_micros(at), offset, d.kind, d.via, d.trigger, d.status,
                d.reason))
        except ValueError:
            pass
    return _PICKLED_DECISION + pickle.dumps(d.__getstate__(),  # type: ignore[attr-defined]
                                            protocol=pickle.HIGHEST_PROTOCOL)


def unpack_decision(blob: bytes) -> Decision:
    """The decision ``pack_decision`` gave these bytes for."""
    d = _new(Decision)
    if blob[:1] == _MARSHALLED_DECISION:
        row = marshal.loads(blob[1:])
        _decision_state(d, (*row[:5], from_micros(row[5], row[6]), *row[7:]))
    else:
        _decision_state(d, pickle.loads(blob[1:]))
    return d


def decided(c: Customer) -> dict[str, Decision]:
    """A customer's decisions by id, as objects."""
    return {did: unpack_decision(blob) for did, blob in (c.decisions or {}).items()}


def packed(decisions: Mapping[str, Decision]) -> dict[str, bytes]:
    """Decisions by id, as a customer keeps them."""
    return {did: pack_decision(d) for did, d in decisions.items()}


#: a window of times (and amounts) is a bytearray of doubles
_DOUBLE = struct.Struct("d")
_double = _DOUBLE.pack
_two_doubles = struct.Struct("dd").pack
_double_at = _DOUBLE.unpack_from


def doubles(window: bytes | bytearray) -> tuple[float, ...]:
    """The numbers a window holds."""
    return struct.unpack(f"{len(window) // 8}d", window)


def _trim(window: bytearray, edge: float, *, from_edge: bool, stride: int = 1) -> None:
    """Drop the leading entries of a time-ordered window (a time every ``stride``
    numbers) before ``edge``, and at it unless ``from_edge``."""
    step = 8 * stride
    start, end = 0, len(window)
    if from_edge:
        while start < end and _double_at(window, start)[0] < edge:
            start += step
    else:
        while start < end and _double_at(window, start)[0] <= edge:
            start += step
    if start:
        del window[:start]


def _link(value: Any) -> Any:
    """A field value that links a recovery to its incident, made hashable."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _row(event: Event) -> tuple[Any, ...]:
    """An event as a plain row, ordered by (time, id, source)."""
    return (event.ts, event.id, event.source, event.type, event.at, event.props)


_MARSHALLED, _PICKLED = 0, 1
#: a row's header in a log: its length and how it is encoded
_HEADER = struct.Struct("<IB").pack


def _pack(row: tuple[Any, ...]) -> bytes:
    """A row as bytes for a customer's event log.

    The log is one bytearray per customer: a history kept as a list of objects
    would be walked by Python's cycle collector at every full collection, which
    at a million events costs more than processing them. The time travels as
    integer microseconds and a UTC offset, so it comes back exactly; a row that
    marshal cannot hold (a time zone with rules, an unusual property value
    given through the API) is pickled instead.
    """
    ts, event_id, source, kind, at, props = row
    if type(props) is not dict:
        props = dict(props)
        row = (ts, event_id, source, kind, at, props)
    offset = fixed_offset(at)
    if offset is not None:
        try:
            body = marshal.dumps((to_micros(at), event_id, source, kind, offset, props))
            return _HEADER(len(body), _MARSHALLED) + body
        except ValueError:
            pass
    try:
        body = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # an object that cannot be kept, given through the API
        raise EventError(f"a property value cannot be stored: {exc}",
                         event_id=event_id) from None
    return _HEADER(len(body), _PICKLED) + body


def _unpack(log: bytes | bytearray) -> Iterator[tuple[Any, ...]]:
    """The rows of an event log, in the order they were packed."""
    view = memoryview(log)
    at = 0
    end = len(view)
    while at < end:
        size = int.from_bytes(view[at:at + 4], "little")
        body = view[at + 5:at + 5 + size]
        if view[at + 4] == _MARSHALLED:
            micros, event_id, source, kind, offset, props = marshal.loads(body)
            yield (micros / 1_000_000, event_id, source, kind, from_micros(micros, offset),
                   props)
        else:
            yield pickle.loads(body)
        at += 5 + size



def _event_of(customer: str, row: tuple[Any, ...]) -> Event:
    return Event(id=row[1], customer=customer, type=row[3], at=row[4], source=row[2],
                 props=dict(row[5]))


def _trigger(event: Event) -> str:
    """What names an event in a decision id: its id, qualified by its source if any."""
    return f"{event.source}/{event.id}" if event.source else event.id


def _moment(value: str | datetime) -> float:
    try:
        return parse_instant(value).timestamp()
    except TimeFormatError as exc:
        raise EventError(str(exc), field="at") from None


class Engine:
    """The tolerance-capital engine, in memory.

    >>> engine = Engine.from_path("examples/rules/retail.yaml")  # doctest: +SKIP
    """

    def __init__(self, rules: RuleSet):
        self._customers: dict[str, Customer] = {}
        # event ids seen, without and with a source: dicts of strings, which the
        # cycle collector does not track (a set of tuples it would walk in full)
        self._seen: dict[str, None] = {}
        self._seen_from: dict[str, dict[str, None]] = {}
        self._due: list[tuple[float, str]] = []
        self._view = CustomerView(capital=None, level=None, purchases=0, spent=0.0,
                                  days_since_contact=None, consent=True)
        self._derive(rules)

    def _derive(self, rules: RuleSet) -> None:
        """What the hot path reads of the rules, looked up once."""
        self._rules = rules
        self._recovery_window = max(
            (r.recovery.within for r in rules.rules if r.recovery), default=0.0)
        #: event type -> consent after it (True: given back, False: withdrawn)
        self._consent_after = {**{kind: True for kind in rules.consent.restore_on},
                               **{kind: False for kind in rules.consent.withdraw_on}}
        self._contacts = rules.silence.contacts if rules.silence else None
        self._type_plans: dict[str, _TypePlan] = {}

    def _type_plan(self, kind: str) -> _TypePlan:
        """What an event type asks of the hot path, worked out once per type."""
        rules = self._rules
        matching = rules.by_type.get(kind, rules.any_type)
        rewards = rules.recognition_for(kind)
        conditions = [r.condition for r in matching] + [
            r.condition for r in rewards if r.condition is not None]
        plan = _TypePlan(
            rules=matching,
            rewards=rewards,
            consent=self._consent_after.get(kind),
            contact=self._contacts is None or kind in self._contacts,
            opens=kind in rules.capital.opens_on,
            view=any(c.customer_fields for c in conditions),
            level=any("level" in c.customer_fields for c in conditions),
        )
        if len(self._type_plans) < _MAX_PLANS:  # event types come from the outside: bounded
            self._type_plans[kind] = plan
        return plan

    @classmethod
    def from_path(cls, path: str | Path) -> Engine:
        """An engine with the rules of a file or folder; raises RuleFileError if broken."""
        return cls(load_rules(path))

    @classmethod
    def open(cls, path: str | Path, rules: RuleSet | str | Path | None = None, *,
             batch_size: int | None = None, read_only: bool = False) -> StoredEngine:
        """An engine whose state lives in a SQLite database (created and migrated on
        open); ``rules`` defaults to the version the database last used. With
        ``read_only``, an existing database opened in SQLite's read-only mode (for
        reports and dashboards: reading works, nothing can be written)."""
        from .store import BATCH, StoredEngine
        return StoredEngine(path, rules, batch_size=batch_size or BATCH,
                            read_only=read_only)

    @property
    def rules(self) -> RuleSet:
        return self._rules

    # -- public API ----------------------------------------------------------------

    def process(self, event: Mapping[str, Any] | Event, *, source: str = "") -> Outcome:
        """Process one event; returns what it did. Raises EventError for a bad event."""
        if isinstance(event, Event):
            check_event(event)  # (a mapping is checked as it becomes an Event)
            return self._process(event)
        return self._process(Event.from_dict(event, source=source))

    def _process(self, ev: Event) -> Outcome:
        """Process one event already checked (given as a mapping, or by ``process``)."""
        seen = self._seen if not ev.source else self._seen_from.setdefault(ev.source, {})
        if ev.id in seen:
            return Outcome(event=ev, capital_before=None, capital_after=None, duplicate=True)
        customer = self._customers.get(ev.customer)
        if customer is None:
            customer = self._customers[ev.customer] = Customer(id=ev.customer)
        if not self._late(customer, ev):
            mark, decided = len(customer.log), len(customer.decisions or ())
            try:
                before, after, ledger, decisions = self._apply(customer, ev)
                customer.log += _pack((ev.ts, ev.id, ev.source, ev.type, ev.at, ev.props))
            except BaseException:
                self._undo(customer, mark, decided)  # an event is applied whole or not at all
                raise
            customer.last = (ev.ts, ev.id, ev.source)
        else:
            before, after, ledger, decisions = self._replay(customer, ev)
            customer = self._customers[ev.customer]
            customer.dirty = True
        seen[ev.id] = None
        # A schedule only has to be early. An event that took no points and moved no
        # level leaves future capital at or above what was foreseen, so a
        # still-future schedule stays valid for firing; re-arming could come sooner
        # only with points given, or with more room for the licence once the
        # silence drain or a trace at its floor is settled into the balance
        # (``_apply`` marks both): otherwise the planners bound capital from above
        # with the silence drained when they ran, which a contact never gives back.
        if customer.dirty or customer.levels_due <= ev.ts or customer.scheduled <= ev.ts:
            self._schedule(customer)
        return _outcome(ev, before, after, tuple(ledger), tuple(decisions))

    def process_many(self, events: Iterable[Mapping[str, Any] | Event],
                     *, source: str = "") -> list[Outcome]:
        """Process a batch of events in order; returns their outcomes.

        Python's cycle collector is paused during the batch and runs once after it:
        the engine makes no reference cycles, and a collector that rescans a large,
        growing state every few thousand events costs a bulk load more than the
        processing itself. A bad event raises EventError; the outcomes of the
        events before it are kept in the engine, as with ``process``.
        """
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return [self.process(event, source=source) for event in events]
        finally:
            if was_enabled:
                gc.enable()

    def capital(self, customer: str, at: str | datetime | None = None) -> float | None:
        """Capital of a customer at a time (default: their latest event); None if not open."""
        c = self._customers.get(customer)
        if c is None:
            return None
        if at is None:
            return None if c.opened_at is None or c.last is None else capital_at(
                c, self._rules, c.last[0])
        t = _moment(at)
        if c.last is not None and t < c.last[0]:
            c = self._rebuild(c.id, [r for r in self._history(c) if r[0] <= t],
                              horizon=-math.inf)
        if c.opened_at is None or t < c.opened_at:
            return None
        return capital_at(c, self._rules, t)

    def event_times(self, customer: str) -> list[float]:
        """The times (seconds) of a customer's events, in order: where their capital
        may jump (between them it moves only with time)."""
        c = self._customers.get(customer)
        return [] if c is None else sorted(row[0] for row in self._history(c))

    def states(self, customer: str, until: str | datetime) -> Iterator[tuple[float, Customer]]:
        """A customer replayed from their events up to ``until``, once: after each
        moment that has events, (that moment, the customer as they were just after
        it). Until their next event, their capital at ``t`` is ``capital_at(that
        customer, rules, t)``, so this draws a trajectory in one replay (see
        ``charts``). The customer yielded is the replay's own, changed by the next
        step: read it before asking for the next."""
        c = self._customers.get(customer)
        if c is None:
            return
        t_end = _moment(until)
        rows = sorted((r for r in self._history(c) if r[0] <= t_end), key=lambda r: r[:3])
        fresh = Customer(id=c.id)
        for i, row in enumerate(rows):  # (as _rebuild does, one moment at a time)
            self._apply(fresh, _event_of(c.id, row))
            fresh.log += _pack(row)
            fresh.last = row[:3]
            self._plan(fresh)
            if i + 1 == len(rows) or rows[i + 1][0] != row[0]:
                yield row[0], fresh

    def level(self, customer: str) -> str | None:
        """The lowest level that fired for a customer and has not re-armed."""
        c = self._customers.get(customer)
        return None if c is None else c.level(self._rules)

    def tick(self, now: str | datetime) -> list[Decision]:
        """Apply what time did up to ``now`` (levels fired or re-armed by silence, fades
        and the licence) for the customers that are due; returns the new decisions."""
        t = _moment(now)
        made: list[Decision] = []
        due = self._due
        while due and due[0][0] <= t:
            when, cid = heapq.heappop(due)
            customer = self._customers[cid]
            if customer.scheduled != when:
                continue  # superseded by another schedule
            made.extend(self._tick_one(customer, t))
        made.sort(key=lambda d: (d.at, d.id))
        return made

    def _tick_one(self, customer: Customer, t: float) -> list[Decision]:
        """What time did to one due customer up to ``t``; plans them again."""
        made: list[Decision] = []
        if customer.level_time < t:
            made = self._advance(customer, t, include_end=True)
            customer.level_time = t
            customer.horizon = max(customer.horizon, t)
        # (a customer whose events already went past `t` is only re-planned)
        customer.scheduled = math.inf
        self._schedule(customer)
        return made

    def explain(self, customer: str, at: str | datetime | None = None) -> list[LedgerEntry]:
        """The ledger of one customer, in time order: all of it, or, ``at`` a moment,
        what their events up to it did followed by what time did since and no event
        has settled (silence, fading traces, licence steps, the clamp to the bounds;
        marked ``settled=False``). The entries up to a moment add up to the capital
        at that moment.

        The ledger is not kept: it is derived again from the customer's events, so
        memory holds only what the next event needs.
        """
        c = self._customers.get(customer)
        if c is None:
            return []
        ledger: list[LedgerEntry] = []
        if at is None:
            self._rebuild(c.id, self._history(c), horizon=-math.inf, ledger=ledger)
        else:
            self.as_of(customer, at, ledger=ledger)
        return ledger

    def as_of(self, customer: str, at: str | datetime,
              ledger: list[LedgerEntry] | None = None) -> Customer | None:
        """A copy of a customer as they were at ``at``: their events up to it applied,
        and what time did up to it to their levels (None if unknown). With
        ``ledger``, collects the entries that explain their capital at ``at``."""
        c = self._customers.get(customer)
        if c is None:
            return None
        t = _moment(at)
        fresh = self._rebuild(c.id, [r for r in self._history(c) if r[0] <= t],
                              horizon=t, ledger=ledger)
        if ledger is not None and fresh.opened_at is not None and fresh.opened_at <= t:
            moment = at if isinstance(at, datetime) else parse_instant(at)
            ledger.extend(unsettled_entries(fresh, self._rules, t, moment))
        return fresh

    def decisions(self, customer: str | None = None, *, status: str | None = None
                  ) -> list[Decision]:
        """Decisions made so far (of one customer, or all), oldest first."""
        pool = ([self._customers[customer]] if customer in self._customers else []
                ) if customer is not None else self._customers.values()
        found = [d for c in pool for d in decided(c).values()
                 if status is None or d.status == status]
        found.sort(key=lambda d: (d.at, d.id))
        return found

    def customers(self) -> Iterator[str]:
        return iter(self._customers)

    def capitals(self, now: str | datetime | None = None) -> Iterator[tuple[str, str | None,
                                                                           float]]:
        """(customer, level, capital) at ``now`` (default: the latest event) of every
        customer open by then, in id order."""
        lasts = [c.last[0] for c in self._customers.values() if c.last is not None]
        if not lasts:
            return
        t = max(lasts) if now is None else _moment(now)
        for cid in sorted(self._customers):
            c = self.as_of(cid, from_seconds(t))
            if c is not None and c.opened_at is not None and c.opened_at <= t:
                yield cid, c.level(self._rules), capital_at(c, self._rules, t)

    def next_change(self, customer: str) -> float:
        """When, with no new event, something would change for this customer (seconds)."""
        c = self._customers.get(customer)
        return math.inf if c is None else c.next_change

    def use_rules(self, rules: RuleSet | str | Path) -> None:
        """Switch to another rule set (loaded first: a broken one raises and changes
        nothing) and recompute every customer from their events."""
        new = rules if isinstance(rules, RuleSet) else load_rules(rules)
        self._derive(new)
        self._due = []
        for cid, old in list(self._customers.items()):
            fresh = self._rebuild(cid, self._history(old), horizon=old.horizon)
            if old.decisions:
                fresh.decisions = {**old.decisions, **(fresh.decisions or {})}
            self._customers[cid] = fresh
            self._schedule(fresh)

    # -- processing one event ---------------------------------------------------------

    def _apply(self, c: Customer, ev: Event
               ) -> tuple[float | None, float | None, list[LedgerEntry], list[Decision]]:
        rules = self._rules
        t = ev.ts
        opened = c.opened_at is not None
        ledger: list[LedgerEntry] = []
        decisions: list[Decision] = []
        if opened and t > c.levels_due:
            # what time did before this event, judged with the consent of that time
            decisions.extend(self._advance(c, t, include_end=False))
        consent_before = c.consent
        kind = ev.type
        plan = self._type_plans.get(kind) or self._type_plan(kind)
        if plan.consent is not None:
            c.consent = plan.consent
        cap = rules.capital
        if not opened:
            if not plan.opens:
                return None, None, ledger, decisions
            c.opened_at = c.last_contact = c.clean_since = t
            c.balance = cap.initial
            # bytearrays, not lists: one flag per level, invisible to the collector
            c.armed = bytearray(cap.initial >= lv.fires_below for lv in rules.levels)
            c.fired = bytearray(len(rules.levels))
            c.level_time = t
            self._calm(c)
            ledger.append(LedgerEntry(customer=c.id, rule="opening", points=cap.initial,
                                      at=ev.at, event_id=ev.id, category="opening",
                                      reason=f"relationship opened by {ev.type}: "
                                             f"initial capital {cap.initial:g}"))
            before = None
            days_idle: float | None = 0.0
        else:
            days_idle = (t - c.last_contact) / DAY
            banked = c.balance
            licence, silence, faded, before = settle(c, rules, t, plan.contact)
            settled = banked + licence  # the balance once the licence is banked
            if rules.licence is not None and c.balance != settled and (
                    c.calm_high < _INF or settled >= rules.licence.up_to > c.balance):
                # the silence drain or a trace at its floor went into the balance:
                # capital now is the same, but the licence has more room, so a level
                # waiting to re-arm may do so sooner, and a licence that had none
                # left (its next step planned as never) gives points again
                c.dirty = True
            if licence:
                ledger.append(LedgerEntry(
                    customer=c.id, rule="licence", points=licence, at=ev.at,
                    event_id=ev.id, category="licence",
                    reason=f"points licence: clean since {format_instant(c.clean_since)}"))
            if silence:
                ledger.append(LedgerEntry(
                    customer=c.id, rule="silence", points=-silence, at=ev.at,
                    event_id=ev.id, category="silence",
                    reason=f"silence: {days_idle:.1f} days without contact"))
            for penalty, points in faded:
                ledger.append(fading_entry(c.id, penalty, points, ev.at, ev.id))
            if not c.calm_low <= before < c.calm_high:
                decisions.extend(self._observe(c, before, t, ev.at, _trigger(ev)))
        props = ev.props
        view = None
        if plan.view:
            view = self._view  # one reusable holder: conditions only read it
            view.capital = before if before is not None else cap.initial
            view.level = c.level(rules) if plan.level else None
            view.purchases = c.purchases
            view.spent = c.spent
            view.days_since_contact = days_idle
            view.consent = consent_before
        moved = False
        for rule in plan.rules:
            if not rule.test(ev, props, view):
                continue
            self._apply_rule(c, rule, ev, ledger)
            moved = True
            if rule.then:
                decisions.extend(self._decide(c, rule.name, rule.then, t, ev.at, _trigger(ev),
                                                  0.0))
        if kind == PURCHASE:
            c.purchases += 1
            amount = props.get("amount")
            if isinstance(amount, int | float) and not isinstance(amount, bool):
                c.spent += amount
        if plan.rewards:
            decisions.extend(self._recognise(c, ev, view, plan.rewards))
        if moved and c.calm_high < _INF:
            c.dirty = True  # points given may bring a level's re-arming sooner
        after = capital_at(c, rules, t) if moved or before is None else before
        if not c.calm_low <= after < c.calm_high:
            decisions.extend(self._observe(c, after, t, ev.at, _trigger(ev)))
        c.level_time = t
        return before, after, ledger, decisions

    def _apply_rule(self, c: Customer, rule: Any, ev: Event,
                    ledger: list[LedgerEntry]) -> None:
        cap = self._rules.capital
        t = ev.ts
        points = rule.points
        note = ""
        if rule.repeat is not None:
            if c.repeats is None:
                c.repeats = {}
            window = c.repeats.get(rule.name)
            if window is None:
                window = c.repeats[rule.name] = bytearray()
            _trim(window, t - rule.repeat.within, from_edge=True)
            earlier = len(window) // 8  # matches in [t - W, t): not those at this instant
            while earlier and _double_at(window, 8 * (earlier - 1))[0] >= t:
                earlier -= 1
            if earlier:
                try:
                    multiplier = min(rule.repeat.factor ** earlier, _MAX_MULTIPLIER)
                except OverflowError:
                    multiplier = _MAX_MULTIPLIER
                points = max(-_MAX_POINTS, min(_MAX_POINTS, points * multiplier))
                note = f", repeat #{earlier + 1} (x{multiplier:g})"
            window += _double(t)
        penalty = None
        applied = points
        if points < 0 and rule.fade is not None:
            # (the event named with its source: two incidents never give equal tuples)
            penalty = fading_penalty(-points, t, rule.fade_key, rule.keep, rule.name,
                                     _trigger(ev))
            c.penalties = (*c.penalties, penalty)
            reason = rule.reason + note if note else rule.reason
        elif points:
            old = c.balance
            c.balance = clamp(old + points, cap.min, cap.max)
            applied = c.balance - old
            reason = rule.reason + note if note else rule.reason
            if applied != points:
                reason += (f" ({applied:+g} applied: the settled balance stays within "
                           f"[{cap.min:g}, {cap.max:g}])")
        else:
            reason = ""
        if points < 0:
            c.clean_since = t
            c.steps = 0
            c.dirty = True  # capital lower than foreseen: something may come sooner
            for field in rule.recovered_by:
                link = _link(ev.get(field))
                if link is not None:
                    self._remember(c, (rule.name, field, link),
                                   (t, penalty, -applied, False, _trigger(ev)))
        if reason:
            ledger.append(_entry((c.id, rule.name, applied, ev.at, ev.id, rule.category,
                                  reason, True)))
        if rule.recovery is not None:
            self._recover(c, rule, ev, ledger)

    def _remember(self, c: Customer, key: tuple[str, Any], taken: tuple[Any, ...]) -> None:
        if c.taken is None:
            c.taken = {}
        if len(c.taken) >= 16:
            horizon = taken[0] - self._recovery_window
            for stale in [key for key, kept in c.taken.items()
                          if (old := Taken(*kept)).at < horizon or old.recovered]:
                del c.taken[stale]
        c.taken[key] = taken

    def _recover(self, c: Customer, rule: Any, ev: Event,
                 ledger: list[LedgerEntry]) -> None:
        rec = rule.recovery
        t = ev.ts
        link = _link(ev.get(rec.match))
        # an incident is found by its field and value: a ticket "x1" is not an order "x1"
        key = (rec.rule, rec.match, link)
        kept = c.taken.get(key) if link is not None and c.taken else None
        if kept is None and link is not None and c.taken:
            key = (rec.rule, link)  # (remembered by a snapshot written before fields were)
            kept = c.taken.get(key)
        if kept is None:
            return
        taken = Taken(*kept)
        if taken.recovered or t - taken.at > rec.within:
            return
        cap = self._rules.capital
        refund = faded = 0.0
        penalty = taken.penalty
        share = 1.0 - rec.refund  # of the incident, left to recover
        if penalty is not None and penalty in c.penalties:  # (still fading: not settled)
            refund = remaining(penalty, t) * rec.refund
            # the ledger took all of the recovered share; part of it had faded already
            faded = penalty[0] * rec.refund - refund
            index = c.penalties.index(penalty)
            points = penalty[0] * share
            left = fading_penalty(points, *penalty[1:6]) if points > 0 else None
            c.penalties = (*c.penalties[:index], *((left,) if left else ()),
                           *c.penalties[index + 1:])
            now = left if left is not None else (0.0, *penalty[1:])
        else:
            points, keep = (0.0, 0.0) if penalty is None else (penalty[0], penalty[3])
            owed = taken.permanent if penalty is None else points * keep
            old = c.balance
            c.balance = clamp(old + owed * rec.refund, cap.min, cap.max)
            refund = c.balance - old
            now = None if penalty is None else (points * share, *penalty[1:])
        # another recovery of the same incident (matched on another field) recovers
        # its share of what is left of it; nothing once all of it came back
        for other, held in list(c.taken.items()):
            same = Taken(*held)
            if other == key or (other[0] == key[0] and (
                    same.event == taken.event if taken.event is not None
                    else penalty is not None and same.penalty == penalty)):
                c.taken[other] = tuple(same._replace(
                    penalty=now, permanent=same.permanent * share,
                    recovered=same.recovered or other == key))
        if faded:
            ledger.append(fading_entry(c.id, penalty, faded, ev.at, ev.id))
        if refund:
            ledger.append(LedgerEntry(
                customer=c.id, rule=rule.name, points=refund, at=ev.at, event_id=ev.id,
                category=rule.category,
                reason=f"{rule.name}: recovers {rec.refund:.0%} of {rec.rule} "
                       f"({rec.match} {link}), {refund:+.2f} points"))
        if rec.bonus:
            old = c.balance
            c.balance = clamp(old + rec.bonus, cap.min, cap.max)
            ledger.append(LedgerEntry(
                customer=c.id, rule=rule.name, points=c.balance - old, at=ev.at,
                event_id=ev.id, category=rule.category,
                reason=f"{rule.name}: bonus {rec.bonus:+g} for an incident well resolved"))

    def _recognise(self, c: Customer, ev: Event, view: CustomerView | None,
                   rewards: tuple[Any, ...]) -> list[Decision]:
        made: list[Decision] = []
        t = ev.ts
        for rec in rewards:
            if rec.every is not None:
                assert rec.condition is not None
                if not rec.test(ev, ev.props, view):
                    continue
                if c.counts is None:
                    c.counts = {}
                count = c.counts[rec.name] = c.counts.get(rec.name, 0) + 1
                if count % rec.every == 0:
                    made.extend(self._decide(c, rec.name, rec.then, t, ev.at, _trigger(ev), 0.0,
                                             extra={"count": count}))
                continue
            if ev.type != PURCHASE or (c.rewarded is not None and rec.name in c.rewarded):
                continue
            if rec.test is not None and not rec.test(ev, ev.props, view):
                continue
            if c.windows is None:
                c.windows = {}
            window = c.windows.get(rec.name)
            if window is None:
                window = c.windows[rec.name] = bytearray()
            amount = ev.props.get("amount")
            amount = amount if isinstance(amount, int | float) and not isinstance(
                amount, bool) else 0.0
            window += _two_doubles(t, amount)
            if rec.within is not None:
                _trim(window, t - rec.within, from_edge=False, stride=2)
            count = len(window) // 16
            total = sum(doubles(window)[1::2])
            if (rec.purchases is not None and count >= rec.purchases) or (
                    rec.spent is not None and total >= rec.spent - tie(rec.spent)):
                c.rewarded = (*(c.rewarded or ()), rec.name)
                del c.windows[rec.name]
                made.extend(self._decide(c, rec.name, rec.then, t, ev.at, _trigger(ev), 0.0,
                                         extra={"purchases": count, "spent": total}))
        return made

    # -- levels and decisions ----------------------------------------------------------

    def _advance(self, c: Customer, t: float, *, include_end: bool) -> list[Decision]:
        """Level firings and re-armings that time alone caused since the last update."""
        if c.opened_at is None or not self._rules.levels or t <= c.level_time:
            return []
        if t < c.levels_due or (t == c.levels_due and not include_end):
            return []  # levels_due is never later than the first thing time could do
        made: list[Decision] = []
        moves = level_transitions(c, self._rules, c.armed, c.level_time, t,
                                  include_end=include_end)
        for at, index, kind in moves:
            if kind == FIRE:
                c.fired[index] = True
                made.extend(self._fire(c, index, at, from_seconds(at),
                                       "time:" + format_instant(at)))
            else:
                c.fired[index] = False
        if moves:
            self._calm(c)
        return made

    def _observe(self, c: Customer, capital: float, t: float, at: datetime, trigger: str
                 ) -> list[Decision]:
        made: list[Decision] = []
        for index, level in enumerate(self._rules.levels):
            if c.armed[index]:
                if capital < level.fires_below:
                    c.armed[index] = False
                    c.fired[index] = True
                    made.extend(self._fire(c, index, t, at, trigger))
            elif capital >= level.rearms_at:
                c.armed[index] = True
                c.fired[index] = False
        self._calm(c)
        return made

    def _calm(self, c: Customer) -> None:
        """Recompute the band of capital in which no level can fire or re-arm."""
        low, high = -math.inf, math.inf
        for level, armed in zip(self._rules.levels, c.armed, strict=True):
            if armed:
                low = max(low, level.fires_below)
            else:
                high = min(high, level.rearms_at)
        c.calm_low, c.calm_high = low, high
        c.dirty = True

    def _fire(self, c: Customer, index: int, t: float, at: datetime, trigger: str
              ) -> list[Decision]:
        level = self._rules.levels[index]
        return self._decide(c, level.name, level.then, t, at, trigger, level.holdout)

    def _decide(self, c: Customer, cause: str, refs: tuple[ActionRef, ...], t: float,
                at: datetime, trigger: str, holdout: float,
                extra: Mapping[str, Any] | None = None) -> list[Decision]:
        rules = self._rules
        held = in_holdout(c.id, cause, holdout)
        pressure = rules.pressure
        made = []
        for ref in refs:
            did = decision_id(c.id, cause, trigger, ref.name)
            if c.decisions is None:
                c.decisions = {}
            elif did in c.decisions:
                continue
            action = rules.actions[ref.name]
            status, reason = PENDING, None
            if held:
                status, reason = HELD_OUT, "holdout"
            elif action.kind == "marketing" and not c.consent:
                status, reason = SUPPRESSED, "consent"
            elif pressure is not None and action.kind in pressure.kinds:
                window = c.pressure
                if window is None:
                    window = c.pressure = bytearray()
                _trim(window, t - pressure.per, from_edge=False)
                if len(window) // 8 >= pressure.max:
                    status, reason = SUPPRESSED, "pressure"
                else:
                    window += _double(t)
            params = {**action.params, **ref.params}
            if extra:
                params = {**extra, **params}
            decision = Decision(
                id=did, customer=c.id, rule=cause,
                action=ref.name, params=params, at=at, kind=action.kind, via=action.via,
                trigger=trigger, status=status, reason=reason)
            c.decisions[did] = pack_decision(decision)
            made.append(decision)
        return made

    # -- replays and the schedule ----------------------------------------------------

    def _rebuild(self, cid: str, rows: Iterable[tuple[Any, ...]], *, horizon: float,
                 ledger: list[LedgerEntry] | None = None,
                 watched: dict[int, tuple[Any, ...]] | None = None) -> Customer:
        """A customer recomputed from their events in time order, then brought to the
        tick horizon they had; collects the ledger into ``ledger`` when one is given,
        and what each row whose ``id`` is a key of ``watched`` did, into it."""
        fresh = Customer(id=cid)
        for row in sorted(rows, key=lambda r: r[:3]):
            outcome = self._apply(fresh, _event_of(cid, row))
            fresh.log += _pack(row)
            fresh.last = row[:3]
            self._plan(fresh)
            if watched is not None and id(row) in watched:
                watched[id(row)] = outcome
            if ledger is not None:
                ledger.extend(outcome[2])
        if horizon > fresh.level_time and fresh.opened_at is not None:
            self._advance(fresh, horizon, include_end=True)
            fresh.level_time = horizon
            self._plan(fresh)
        fresh.horizon = horizon
        return fresh

    def _replay(self, c: Customer, ev: Event
                ) -> tuple[float | None, float | None, list[LedgerEntry], list[Decision]]:
        """A late event: recompute the customer from all their events, in time order."""
        row = _row(ev)
        done, new = self._recompute_with(c, [row])
        new.sort(key=lambda d: (d.at, d.id))
        before, after, ledger, _ = done[id(row)]
        return before, after, ledger, new

    def _recompute_with(self, c: Customer, rows: list[tuple[Any, ...]]
                        ) -> tuple[dict[int, tuple[Any, ...]], list[Decision]]:
        """``c`` recomputed from their events and the late ``rows``, in time order, and
        kept: what each row did (by its ``id``) and the decisions new to the outbox."""
        done: dict[int, tuple[Any, ...]] = {id(row): (None, None, [], []) for row in rows}
        ledger: list[LedgerEntry] = []
        fresh = self._rebuild(c.id, [*self._history(c), *rows], horizon=c.horizon,
                              ledger=ledger, watched=done)
        new = self._reconcile(decided(c), fresh)
        fresh.scheduled = c.scheduled
        self._customers[c.id] = fresh
        self._recomputed(fresh, ledger)
        return done, new

    @staticmethod
    def _late(c: Customer, ev: Event) -> bool:
        """Whether ``ev`` comes before what ``c``'s state already holds (their latest
        event, or a tick past it): applying it means recomputing them."""
        last = c.last
        return last is not None and not (ev.ts >= c.level_time and (
            ev.ts > last[0] or (ev.ts, ev.id, ev.source) > last))

    def _replay_all(self, events: list[Event]) -> dict[int, Outcome]:
        """Late events of one customer, new and distinct, recomputed together: one
        replay of their history for all of them, where one each would cost the square
        of their number. Returns the outcome of each (by ``id`` of the event); a
        decision goes with the event that triggered it, one that time made with the
        last of them."""
        c = self._customers[events[0].customer]
        rows = [_row(ev) for ev in events]
        done, new = self._recompute_with(c, rows)
        triggers = {_trigger(ev): ev for ev in events}
        made: dict[int, list[Decision]] = {id(ev): [] for ev in events}
        for d in sorted(new, key=lambda d: (d.at, d.id)):
            made[id(triggers.get(d.trigger, events[-1]))].append(d)
        out = {}
        for ev, row in zip(events, rows, strict=True):
            before, after, entries, _ = done[id(row)]
            seen = self._seen if not ev.source else self._seen_from.setdefault(ev.source, {})
            seen[ev.id] = None
            out[id(ev)] = _outcome(ev, before, after, tuple(entries), tuple(made[id(ev)]))
        fresh = self._customers[c.id]
        fresh.dirty = True
        self._schedule(fresh)
        return out

    def _history(self, c: Customer) -> Iterator[tuple[Any, ...]]:
        """The rows of all of ``c``'s events (a store reads back those it keeps)."""
        return _unpack(c.log)

    def _recomputed(self, c: Customer, ledger: list[LedgerEntry]) -> None:
        """``c`` was recomputed from their events, which moved capital as ``ledger``
        says: the engine keeps no ledger; a store writes it again."""

    def _reconcile(self, known: dict[str, Decision], fresh: Customer) -> list[Decision]:
        """After a replay: the decisions the recomputed history made that are new.

        In memory, what was decided before stays as it was: its outcome was already
        returned to the caller, who may have acted on it.
        """
        new = [d for did, d in decided(fresh).items() if did not in known]
        if known:
            fresh.decisions = {**(fresh.decisions or {}), **packed(known)}
        return new

    def _undo(self, c: Customer, mark: int, decided: int) -> None:
        """Forget the event that failed half way through ``c`` and all it did: the log
        is cut back to ``mark`` bytes and the decisions to the first ``decided``."""
        del c.log[mark:]
        rows = list(self._history(c))
        if not rows:
            del self._customers[c.id]
            return
        fresh = self._rebuild(c.id, rows, horizon=c.horizon)
        if c.decisions:
            kept = dict(itertools.islice(c.decisions.items(), decided))
            fresh.decisions = {**(fresh.decisions or {}), **kept}
        fresh.scheduled = c.scheduled
        self._customers[c.id] = fresh

    def _plan(self, c: Customer) -> None:
        """Recompute when, with no new event, something could next change for ``c``."""
        c.dirty = False
        if c.opened_at is not None:
            c.next_change, c.levels_due = next_level_change(
                c, self._rules, c.level_time, c.calm_low, c.calm_high)

    def _schedule(self, c: Customer) -> None:
        """Plan ``c`` and put it in the tick queue at its next change."""
        self._plan(c)
        when = c.next_change
        if c.opened_at is None or when == c.scheduled:
            return
        c.scheduled = when
        if when < math.inf:
            self._enqueue(c, when)

    def _enqueue(self, c: Customer, when: float) -> None:
        """Put ``c`` in the in-memory tick queue (a store keeps the time instead)."""
        heapq.heappush(self._due, (when, c.id))
        if len(self._due) > 4 * len(self._customers) + 1024:  # drop superseded entries
            self._due = [(cu.scheduled, cu.id) for cu in self._customers.values()
                         if cu.scheduled < math.inf]
            heapq.heapify(self._due)
