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
    ("capital: &a [*a]\n", "nested more than 32 levels deep"),
    ("rules: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("rules:\n  a: {when: '" + "1+" * 3000 + "1 > 0'}\n", "limited to"),
    ("description: !!timestamp 2026-99-99\n", "YAML tag '!!timestamp' is not allowed"),
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
             {"amount": 3, "note": "é"}, {"amount": 4, "big": 2**63 - 1}]
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


@pytest.mark.parametrize("offset", [-3600, -1, -0.002, -0.001, 0, 0.001, 1, 3600])
def test_a_silence_firing_next_to_a_licence_step_is_planned_to_the_millisecond(offset):
    """Silence takes capital below the level ``offset`` seconds from a licence step:
    before it, the firing is then; from the step on, the step's points put it a day
    later. The plan is that time, or the millisecond before, never after."""
    from retention.capital import CapitalState, level_transitions, next_level_change

    day = 86400.0
    rules = engine("""
capital: {initial: 70, min: 0, max: 100}
silence: {after: 5d, rate_per_day: 1}
licence: {clean_for: 10d, points: 1, up_to: 80}
levels:
  - {name: watch, below: 54.9, then: [flag]}
actions:
  flag: {kind: service, via: crm_tag}
""").rules
    now = 1_767_225_600.0
    # the drain passes the 5.1 points of margin 10.1 days after the contact
    contact = now + 10 * day + offset - 10.1 * day
    state = CapitalState(balance=60.0, opened_at=now - day, last_contact=contact,
                         clean_since=now)
    due = next_level_change(state, rules, now, 54.9, math.inf)[1]
    (first, _, kind), *_ = level_transitions(state, rules, bytearray(b"\x01"), now,
                                             now + 365 * day, include_end=True)
    assert kind == "fire"
    # before the step, or (level reached, not passed, by the step's millisecond) a day later
    assert (first < now + 10 * day) == (offset <= -0.002)
    assert 0 <= first - due < 0.0015


@pytest.mark.parametrize("keep, refund, second", [(0, 0.5, 4.8333), (0.5, 1.0, 0.0)])
@pytest.mark.parametrize("reloaded", [False, True])
def test_two_recoveries_of_one_incident_refund_what_is_left(keep, refund, second, reloaded):
    """Two rules recover the same fading incident through different fields: the second
    refunds its share of what the first left (nothing once all of it came back), also
    when the customer came back from a snapshot in between."""
    from retention.snapshot import decode, encode

    e = engine(f"""
capital: {{initial: 70, min: 0, max: 100}}
rules:
  late: {{when: event.type == "late", points: -20, fades_over: 60d, keep: {keep}}}
  fixed: {{when: event.type == "fixed", recovers: late, match: ticket, within: 30d,
          refund: {refund}}}
  refunded: {{when: event.type == "refunded", recovers: late, match: order, within: 30d,
             refund: {refund}}}
""")

    def at(day):
        return f"2024-01-0{day}T00:00:00+00:00"

    e.process({"id": "p", "customer": "c", "type": "purchase", "at": at(1)})
    e.process({"id": "l", "customer": "c", "type": "late", "ticket": "T1", "order": "O1",
               "at": at(2)})
    first = e.process({"id": "f", "customer": "c", "type": "fixed", "ticket": "T1",
                       "at": at(3)})
    # (the ledger took all 20 points: what of the refunded share had faded comes first)
    assert [e.category for e in first.ledger] == ["fading", "recovery"]
    assert first.ledger[1].points == pytest.approx(20 * (1 - 1 / 60) * refund)
    if reloaded:
        e._customers["c"] = decode(encode(e._customers["c"]))
    then = e.process({"id": "r", "customer": "c", "type": "refunded", "order": "O1",
                      "at": at(4)})
    assert sum(x.points for x in then.ledger if x.category != "fading") == pytest.approx(
        second, abs=1e-4)


def test_equal_incidents_from_two_sources_are_recovered_apart():
    """The same event id from two sources at the same time: two incidents, each
    recovered on its own."""
    e = engine("""
capital: {initial: 70, min: 0, max: 100}
rules:
  late: {when: event.type == "late", points: -20, fades_over: 60d}
  fixed: {when: event.type == "fixed", recovers: late, match: ticket, within: 30d,
          refund: 0.5}
""")
    at = "2024-01-0{}T00:00:00+00:00".format
    e.process({"id": "p", "customer": "c", "type": "purchase", "at": at(1)})
    for shop, ticket in (("shopA", "T1"), ("shopB", "T2")):
        e.process({"id": "L", "customer": "c", "type": "late", "ticket": ticket,
                   "at": at(2), "source": shop})
    refunds = [e.process({"id": f"f{ticket}", "customer": "c", "type": "fixed",
                          "ticket": ticket, "at": at(3)}).ledger[-1].points
               for ticket in ("T1", "T2")]
    assert refunds == [pytest.approx(20 * (1 - 1 / 60) * 0.5)] * 2


def test_a_silence_drain_a_hair_below_the_level_before_a_step_is_a_tie():
    """At the millisecond before a licence step the drain takes capital to the level,
    less float rounding (3.6e-15): a tie, so the level does not fire there (it did
    before ties were decided as the arithmetic says). It fires when the drain really
    takes capital below: after the step (29.1) and the contact at 01-21 (28.56), one
    day of grace, then 0.46 points at 0.3 a day: 2026-01-23T12:48."""
    e = engine("""
capital: {initial: 33.26, min: 0, max: 100}
silence: {after: 1d, rate_per_day: 0.3}
licence: {clean_for: 1572480.0005s, points: 1, up_to: 100}
levels:
  - {name: watch, below: 28.1, then: [flag]}
actions:
  flag: {kind: service, via: crm_tag}
""")
    e.process({"id": "p", "customer": "c", "type": "purchase",
               "at": "2026-01-01T00:00:00+00:00"})
    hair = e.capital("c", at="2026-01-19T04:48:00.000+00:00") - 28.1
    assert -1e-12 < hair < 0
    outcome = e.process({"id": "x", "customer": "c", "type": "email_open",
                         "at": "2026-01-21T00:00:00+00:00"})
    assert outcome.decisions == ()
    assert outcome.capital_after == pytest.approx(28.56)
    assert [d.trigger for d in e.tick("2026-03-01T00:00:00+00:00")] == [
        "time:2026-01-23T12:48:00.001Z"]


@pytest.mark.parametrize("refund, first, second", [(0.5, 10.0, 5.0), (1.0, 20.0, 0.0)])
@pytest.mark.parametrize("reloaded", [False, True])
def test_two_recoveries_of_one_permanent_loss_pay_back_what_is_left(
        refund, first, second, reloaded):
    """The same for points taken for good: the loss is paid back once in all."""
    from retention.snapshot import decode, encode

    e = engine(f"""
capital: {{initial: 70, min: 0, max: 100}}
rules:
  complaint: {{when: event.type == "complaint", points: -20}}
  resolved: {{when: event.type == "resolved", recovers: complaint, match: ticket,
             within: 30d, refund: {refund}}}
  refunded: {{when: event.type == "refunded", recovers: complaint, match: order,
             within: 30d, refund: {refund}}}
""")
    at = "2024-01-0{}T00:00:00+00:00".format
    e.process({"id": "p", "customer": "c", "type": "purchase", "at": at(1)})
    e.process({"id": "k", "customer": "c", "type": "complaint", "ticket": "T1",
               "order": "O1", "at": at(2)})
    got = [e.process({"id": "r", "customer": "c", "type": "resolved", "ticket": "T1",
                      "at": at(3)})]
    if reloaded:
        e._customers["c"] = decode(encode(e._customers["c"]))
    got.append(e.process({"id": "o", "customer": "c", "type": "refunded", "order": "O1",
                          "at": at(4)}))
    assert [sum(x.points for x in o.ledger) for o in got] == [first, second]
