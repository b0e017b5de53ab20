"""Snapshots: a customer's state comes back from its bytes exactly."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import attrs
from hypothesis import given

from retention import Engine, load_texts
from retention.snapshot import decode, encode

from .strategies import event_streams, rule_files


def deep(value):
    """A comparable form of a state: attrs objects as (class, fields), recursively."""
    if attrs.has(type(value)):
        return (type(value).__name__, tuple(deep(getattr(value, f.name))
                                            for f in attrs.fields(type(value))))
    if isinstance(value, dict):
        return {k: deep(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(deep(v) for v in value))
    if isinstance(value, datetime):
        return (value.isoformat(), str(value.tzinfo))
    return value


@given(rule_files(), event_streams())
def test_every_state_comes_back_exactly(text, events):
    engine = Engine(load_texts([("rules.yaml", text)]))
    for event in events:
        engine.process(event)
    for cid in engine.customers():
        original = engine._customers[cid]
        blob = encode(original)
        assert blob[:1] == b"M"  # plain values: the fast form
        assert deep(decode(blob)) == deep(original)


def test_unusual_values_fall_back_to_pickle():
    engine = Engine(load_texts([("rules.yaml", """
rules:
  bought: {when: event.type == "purchase", points: 1}
recognition:
  each: {every: 1, when: event.type == "purchase", then: [gift]}
actions:
  gift: {kind: in_purchase}
""")]))
    at = datetime(2026, 3, 29, 1, 30, tzinfo=ZoneInfo("Europe/Paris"))
    engine.process({"id": "e1", "customer": "c", "type": "purchase", "at": at})
    original = engine._customers["c"]
    (kept,) = original.decisions.values()
    assert kept[:1] == b"P"  # a decision at a time in a zone with rules is pickled
    blob = encode(original)
    assert deep(decode(blob)) == deep(original)
    assert decode(blob).decisions == original.decisions
    (decision,) = engine.decisions("c")
    assert decision.at == at and decision.at.tzinfo is at.tzinfo


def _earlier_form(c):
    """A customer as snapshots written before held it: windows, repeat and pressure
    times as lists, granted rewards as a set, decisions as objects."""
    from retention.engine import decided, doubles

    old = attrs.evolve(c)
    old.windows = {k: (list(doubles(w)[0::2]), list(doubles(w)[1::2]))
                   for k, w in (c.windows or {}).items()} or None
    old.repeats = {k: list(doubles(v)) for k, v in (c.repeats or {}).items()} or None
    old.pressure = None if c.pressure is None else list(doubles(c.pressure))
    old.rewarded = None if c.rewarded is None else set(c.rewarded)
    old.decisions = decided(c) or None
    return old


def _as_objects(c):
    from retention.engine import decided

    return attrs.evolve(c, decisions=decided(c))


def _earlier_marshal(blob):
    """The marshal form of a snapshot as written before: the same layout, with the
    windows as lists of numbers (an `after` reward's as (times, amounts)), the
    granted rewards as a set and each decision as the tuple its bytes now marshal."""
    import marshal

    from retention.engine import doubles

    v = list(marshal.loads(blob[1:]))
    v[12] = None if v[12] is None else set(v[12])
    v[13] = {k: (list(doubles(w)[0::2]), list(doubles(w)[1::2])) for k, w in v[13].items()}
    v[14] = {k: list(doubles(times)) for k, times in v[14].items()}
    v[16] = list(doubles(v[16]))
    v[17] = {k: marshal.loads(kept[1:]) for k, kept in v[17].items()}  # a tuple each
    return blob[:1] + marshal.dumps(tuple(v))


def test_snapshots_in_the_earlier_form_still_load():
    import pickle

    from retention.snapshot import _PICKLE

    engine = Engine.from_path("examples/rules/retail.yaml")
    for i in range(6):
        engine.process({"id": f"e{i}", "customer": "c", "type": "purchase", "amount": 60,
                        "sku": "diapers-x", "at": f"2026-01-{i + 1:02d}T10:00:00+00:00"})
    for i, kind in enumerate(("billing_error", "billing_error", "review")):
        engine.process({"id": f"x{i}", "customer": "c", "type": kind, "rating": 5,
                        "text": "kind words, long enough to count",
                        "at": f"2026-02-{i + 1:02d}T10:00:00+00:00"})
    current = engine._customers["c"]
    assert current.windows and current.repeats and current.pressure and current.decisions
    blob = encode(current)
    for earlier in (_earlier_marshal(blob), _PICKLE + pickle.dumps(_earlier_form(current))):
        back = decode(earlier)
        # (decisions compared as objects: equal bytes are not promised, as marshal
        # writes a value shared within what it packs only once)
        assert deep(_as_objects(back)) == deep(_as_objects(decode(blob)))
        # and it carries on exactly as the current form does
        twin = Engine.from_path("examples/rules/retail.yaml")
        twin._customers["c"] = back
        mine = Engine.from_path("examples/rules/retail.yaml")
        mine._customers["c"] = decode(blob)
        later = {"id": "late", "customer": "c", "type": "billing_error",
                 "at": "2026-02-10T10:00:00+00:00"}
        assert deep(twin.process(later)) == deep(mine.process(later))
        assert twin.decisions("c") == mine.decisions("c")


def test_decisions_keep_every_microsecond_and_the_zone_name():
    from datetime import timedelta, timezone

    engine = Engine(load_texts([("rules.yaml", """
rules:
  bought: {when: event.type == "purchase", points: 1, then: [disc]}
actions:
  disc: {kind: in_purchase}
""")]))
    named = timezone(timedelta(hours=-5), "EST")
    moments = [f"2199-12-31T10:00:00.{us:06d}+00:00" for us in range(1, 400, 37)]
    moments += [datetime(2026, 1, 1, 10, tzinfo=named), datetime(2199, 5, 5, tzinfo=named)]
    for i, at in enumerate(moments):
        made = engine.process({"id": f"p{i}", "customer": f"a{i}", "type": "purchase",
                               "at": at}).decisions
        (kept,) = engine.decisions(f"a{i}")
        assert kept.at == made[0].at and kept.at.tzname() == made[0].at.tzname()
        back = decode(encode(engine._customers[f"a{i}"]))
        assert deep(back) == deep(engine._customers[f"a{i}"])


def test_customers_pickled_with_their_capital_apart_still_load(monkeypatch):
    """Snapshots pickled before a customer held its capital itself had a
    CapitalState (None for a prospect) in fourth place, and penalties and taken
    incidents as objects; they load, and a recovery still finds its incident."""
    import pickle

    from retention.capital import CapitalState, LinearFade, Penalty
    from retention.engine import Customer, _Taken
    from retention.snapshot import _PICKLE

    rules = load_texts([("rules.yaml", """
capital: {initial: 70, min: 0, max: 100}
rules:
  late: {when: event.type == "late", points: -20, fades_over: 30d}
  fixed: {when: event.type == "fixed", recovers: late, match: ticket, within: 7d}
  complaint: {when: event.type == "complaint", points: -10}
  answered: {when: event.type == "answered", recovers: complaint, match: ticket, within: 7d}
""")])
    engine = Engine(rules)
    for i, (who, kind, day) in enumerate((("c", "purchase", 1), ("c", "late", 2),
                                          ("v", "view", 2), ("k", "purchase", 1),
                                          ("k", "complaint", 2))):
        engine.process({"id": f"e{i}", "customer": who, "type": kind, "ticket": "t1",
                        "at": f"2026-01-0{day}T10:00:00+00:00"})
    opened, prospect = engine._customers["c"], engine._customers["v"]
    assert opened.penalties and opened.taken and prospect.opened_at is None
    permanent = engine._customers["k"]  # a taken incident and no penalty
    assert permanent.taken and not permanent.penalties
    current = Customer.__getstate__

    def penalty(row):
        return Penalty(row[0], row[1], LinearFade(row[2][1]), *row[3:])

    def earlier(c):
        fields = current(c)
        capital = None if c.opened_at is None else CapitalState(
            balance=c.balance, opened_at=c.opened_at, last_contact=c.last_contact,
            clean_since=c.clean_since, steps=c.steps,
            penalties=[penalty(p) for p in c.penalties] or ())
        taken = None if c.taken is None else {
            key: _Taken(at, None if p is None else penalty(p), permanent, recovered)
            for key, (at, p, permanent, recovered, *_) in c.taken.items()}
        return (*fields[:3], capital, *fields[9:20], taken, *fields[21:])

    blobs = {}
    for customer in (opened, prospect, permanent):
        with monkeypatch.context() as patch:
            patch.setattr(Customer, "__getstate__", earlier)
            blobs[customer.id] = _PICKLE + pickle.dumps(customer)
        assert len(earlier(customer)) == 24
        # (taken incidents did not name their event then)
        expected = attrs.evolve(customer, taken=None if customer.taken is None else {
            key: kept[:4] for key, kept in customer.taken.items()})
        assert deep(decode(blobs[customer.id])) == deep(expected)
    twin = Engine(rules)
    twin._customers["c"] = decode(blobs["c"])
    fixed = {"id": "f", "customer": "c", "type": "fixed", "ticket": "t1",
             "at": "2026-01-04T10:00:00+00:00"}
    outcome = twin.process(fixed)
    assert [(e.rule, e.category) for e in outcome.ledger] == [("late", "fading"),
                                                               ("fixed", "recovery")]
    assert deep(outcome) == deep(engine.process(fixed))
    twin._customers["k"] = decode(blobs["k"])
    answered = {**fixed, "id": "a", "customer": "k", "type": "answered"}
    outcome = twin.process(answered)
    assert [(e.rule, e.points) for e in outcome.ledger] == [("answered", 10)]
    assert deep(outcome) == deep(engine.process(answered))
