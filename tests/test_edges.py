"""Odd but possible input: the engine stays exact, bounded and never half-applies."""

import math

import pytest

from retention import Engine, RuleFileError, load_texts


def engine(text):
    return Engine(load_texts([("r.yaml", text)]))


LICENCE_AND_SILENCE = """
capital: {initial: 70, min: 0, max: 100}
rules:
  incident: {when: event.type == "incident", points: -10}
silence: {after: 10d, rate_per_day: 1}
licence: {clean_for: 5d, points: 5}
levels:
  - {name: watch, below: 50, then: [flag]}
actions:
  flag: {kind: marketing, via: email}
"""


def feed(e, *events):
    for i, (kind, at) in enumerate(events):
        e.process({"id": f"e{i}", "customer": "c", "type": kind, "at": at})


def test_a_tick_before_the_latest_event_keeps_the_customer_in_the_queue():
    split, whole = engine(LICENCE_AND_SILENCE), engine(LICENCE_AND_SILENCE)
    for e in (split, whole):
        feed(e, ("purchase", "2026-01-01T00:00:00Z"), ("incident", "2026-01-02T00:00:00Z"),
             ("ping", "2026-01-09T00:00:00Z"))
    made = split.tick("2026-01-08T00:00:00Z") + split.tick("2026-03-01T00:00:00Z")
    assert [d.to_dict() for d in made] == [d.to_dict() for d in
                                           whole.tick("2026-03-01T00:00:00Z")]
    assert split.level("c") == "watch"


def test_consent_given_later_does_not_change_what_time_decided_before():
    ticked, not_ticked = engine(LICENCE_AND_SILENCE), engine(LICENCE_AND_SILENCE)
    for e in (ticked, not_ticked):
        feed(e, ("purchase", "2026-01-01T00:00:00Z"))
    ticked.tick("2026-02-27T00:00:00Z")
    for e in (ticked, not_ticked):
        e.process({"id": "u", "customer": "c", "type": "unsubscribe",
                   "at": "2026-03-01T00:00:00Z"})
    assert [(d.id, d.status) for d in ticked.decisions()] == \
        [(d.id, d.status) for d in not_ticked.decisions()]
    assert ticked.decisions()[0].status == "pending"


def test_a_link_that_is_not_a_plain_value_still_links():
    e = engine("""
capital: {initial: 70, min: 0, max: 100}
rules:
  complaint: {when: event.type == "complaint", points: -12}
  resolved: {when: event.type == "ticket_resolved", recovers: complaint, match: ticket_id,
             within: 7d}
""")
    e.process({"id": "p", "customer": "c", "type": "purchase", "at": "2026-01-01T00:00:00Z"})
    e.process({"id": "x", "customer": "c", "type": "complaint", "ticket_id": ["T", 1],
               "at": "2026-01-02T00:00:00Z"})
    out = e.process({"id": "y", "customer": "c", "type": "ticket_resolved",
                     "ticket_id": ["T", 1], "at": "2026-01-03T00:00:00Z"})
    assert out.capital_after == 70
    assert e.capital("c", at="2026-01-02T12:00:00Z") == 58


def test_repeat_escalation_stays_finite():
    e = engine("""
capital: {initial: 70, min: 0, max: 100}
rules:
  billing: {when: event.type == "billing", points: -100, fades_over: 30d,
            repeat: {within: 365d, factor: 10}}
""")
    feed(e, ("purchase", "2026-01-01T00:00:00Z"))
    for hour in range(400):
        e.process({"id": f"b{hour}", "customer": "c", "type": "billing",
                   "at": f"2026-01-{2 + hour // 24:02d}T{hour % 24:02d}:00:00Z"})
    for at in ("2026-01-20T00:00:00Z", "2026-06-01T00:00:00Z"):
        value = e.capital("c", at=at)
        assert math.isfinite(value) and 0 <= value <= 100


def test_silence_in_the_ledger_is_what_the_bounds_let_through():
    e = engine("capital: {initial: 10, min: 0, max: 100}\n"
               "silence: {after: 2d, rate_per_day: 1}\n")
    feed(e, ("purchase", "2026-01-01T00:00:00Z"), ("ping", "2026-03-01T00:00:00Z"))
    assert [round(x.points, 6) for x in e.explain("c")] == [10, -10]


@pytest.mark.parametrize(("text", "message"), [
    ("silence: {after: " + "9" * 400 + "d, rate_per_day: 1}\n", "longer than 100 years"),
    ("capital: &a [*a]\n", "too large"),
    ("rules: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("rules:\n  a: {when: '" + "1+" * 3000 + "1 > 0'}\n", "limited to"),
    ("description: !!timestamp 2026-99-99\n", "invalid value"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"{b}: &{b} [{', '.join(['*' + a] * 10)}]\n"
               for a, b in zip("abcde", "bcdef", strict=True)),
     "too large"),
])
def test_hostile_rule_files_fail_clearly(text, message):
    with pytest.raises(RuleFileError) as caught:
        load_texts([("r.yaml", text)])
    assert message in str(caught.value)


def test_a_tiny_drain_never_fires_and_never_crashes():
    e = engine("capital: {initial: 70, min: 0, max: 100}\n"
               "silence: {after: 30d, rate_per_day: 1.0e-300}\n"
               "levels:\n  - {name: watch, below: 55}\n")
    feed(e, ("purchase", "2026-01-01T00:00:00Z"), ("ping", "2027-01-01T00:00:00Z"))
    assert e.tick("2030-01-01T00:00:00Z") == []


def test_a_late_event_replays_times_and_properties_exactly():
    """The history is kept packed; a replay gets back every time zone and value."""
    from datetime import UTC, datetime, timedelta, timezone
    from zoneinfo import ZoneInfo

    rules = """
capital: {initial: 50}
rules:
  order: {when: event.type == "purchase" and event.amount > 1, points: 1}
"""
    e = engine(rules)
    odd = timezone(timedelta(hours=5, minutes=30, seconds=7, microseconds=3))
    times = [
        datetime(2026, 1, 1, 9, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 1, 2, 9, 0, tzinfo=timezone(timedelta(hours=-7))),
        datetime(2026, 1, 3, 9, 0, tzinfo=ZoneInfo("Europe/Paris")),
        datetime(2026, 1, 4, 9, 0, tzinfo=odd),
    ]
    props = [{"amount": 2, "tags": ["a", {"b": None}]}, {"amount": 2.5, "ok": True},
             {"amount": 3, "note": "é"}, {"amount": 4, "big": 10**30}]
    for i in (1, 2, 3):
        e.process({"id": f"o{i}", "customer": "c", "type": "purchase",
                   "at": times[i], **props[i]})
    e.process({"id": "o0", "customer": "c", "type": "purchase", "at": times[0], **props[0]})
    ledger = [x for x in e.explain("c") if x.rule == "order"]
    assert [x.at for x in ledger] == sorted(times)
    assert [x.at.utcoffset() for x in ledger] == [t.utcoffset() for t in times]
    assert [x.event_id for x in ledger] == ["o0", "o1", "o2", "o3"]
    assert e.capital("c", at="2026-02-01T00:00:00Z") == 54


def test_a_property_that_cannot_be_kept_is_refused_whole():
    from retention import EventError

    e = engine("capital: {initial: 50}\nrules:\n  r: {when: event.type == 'x', points: -5}\n")
    e.process({"id": "o", "customer": "c", "type": "purchase", "at": "2026-01-01T00:00:00Z"})
    e.process({"id": "a", "customer": "c", "type": "x", "at": "2026-01-01T01:00:00Z"})
    with pytest.raises(EventError, match="cannot be stored"):
        e.process({"id": "b", "customer": "c", "type": "x", "at": "2026-01-02T00:00:00Z",
                   "handle": lambda: None})
    assert e.capital("c", at="2026-01-03T00:00:00Z") == 45
    assert [x.event_id for x in e.explain("c")] == ["o", "a"]
