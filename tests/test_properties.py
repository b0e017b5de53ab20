"""The invariants of docs/concepts.md's arithmetic, on generated rule files and event streams."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from retention import Engine, load_texts

from .strategies import event_streams, moments, rule_files


def engine_for(text: str, events=()) -> Engine:
    engine = Engine(load_texts([("generated.yaml", text)]))
    for event in events:
        engine.process(event)
    return engine


def state_of(engine: Engine, customers=("a", "b"), at: str = "2026-06-01T00:00:00+00:00"):
    """What must not depend on ingestion: capital over time, levels, the ledger."""
    return {
        c: (
            engine.capital(c, at=at),
            engine.level(c),
            [(e.rule, round(e.points, 6), e.event_id, e.at) for e in engine.explain(c)],
        )
        for c in customers
    }


@given(rule_files(), event_streams(), st.lists(moments(), min_size=1, max_size=5))
def test_capital_stays_within_bounds(text, events, times):
    engine = engine_for(text)
    cap = engine.rules.capital
    for event in events:
        outcome = engine.process(event)
        for value in (outcome.capital_before, outcome.capital_after):
            assert value is None or cap.min <= value <= cap.max
    for customer in ("a", "b"):
        for at in times:
            value = engine.capital(customer, at=at)
            assert value is None or cap.min <= value <= cap.max


@given(rule_files(), event_streams(), st.randoms(use_true_random=False))
def test_any_ingestion_order_gives_the_same_state(text, events, rng):
    in_order = engine_for(text, events)
    shuffled_events = list(events)
    rng.shuffle(shuffled_events)
    shuffled = engine_for(text, shuffled_events)
    assert state_of(shuffled) == state_of(in_order)
    # decisions made in order are all there; a late event never retracts what was decided
    assert {d.id for d in in_order.decisions()} <= {d.id for d in shuffled.decisions()}


@given(rule_files(), event_streams(), st.data())
def test_ingesting_twice_equals_once(text, events, data):
    once, twice = engine_for(text, events), engine_for(text, events)
    repeats = data.draw(st.lists(st.sampled_from(events), max_size=10))
    for event in repeats:
        outcome = twice.process(event)
        assert outcome.duplicate
        assert outcome.ledger == () and outcome.decisions == ()
    assert state_of(twice) == state_of(once)
    assert [d.to_dict() for d in twice.decisions()] == [d.to_dict() for d in once.decisions()]


@given(rule_files(), event_streams(), moments(), moments())
def test_two_ticks_equal_one(text, events, t1, t2):
    t1, t2 = sorted((t1, t2))
    split, whole = engine_for(text, events), engine_for(text, events)
    made = split.tick(t1) + split.tick(t2)
    at_once = whole.tick(t2)
    assert [d.to_dict() for d in made] == [d.to_dict() for d in at_once]
    assert [split.level(c) for c in "ab"] == [whole.level(c) for c in "ab"]


@given(rule_files(), event_streams(), moments())
def test_rerunning_never_duplicates_a_decision(text, events, now):
    first, second = engine_for(text, events), engine_for(text, events)
    first.tick(now)
    second.tick(now)
    ids = [d.id for d in first.decisions()]
    assert len(ids) == len(set(ids))
    assert ids == [d.id for d in second.decisions()]


@given(rule_files(), event_streams(max_size=15), moments())
def test_tick_fires_exactly_what_the_next_event_would_see(text, events, now):
    """Levels fired by time are the same whether a tick or a later event finds them.

    The probe comes after every event: an earlier one would be a contact in the
    middle of the history and end a silence the tick leaves running.
    """
    now = max([now] + [e["at"] for e in events])  # all in UTC, same format
    ticked, touched = engine_for(text, events), engine_for(text, events)
    ticked.tick(now)
    for customer in ("a", "b"):
        touched.process({"id": f"late-ping-{customer}", "customer": customer,
                         "type": "noop", "at": now})
        assert touched.level(customer) == ticked.level(customer)


@given(rule_files(), event_streams(), st.lists(moments(), max_size=4), moments())
def test_ticks_between_events_change_no_decision(text, events, ticks, end):
    """Ticking along the way, even before some customers' latest events, decides
    exactly what one tick at the end decides (events at a tick's time come first)."""
    from retention.times import parse_instant

    def at(value):
        return parse_instant(value).timestamp()

    end = max([end, *ticks], key=at)
    along = engine_for(text)
    timeline = sorted([(at(e["at"]), 0, e) for e in events] + [(at(t), 1, t) for t in ticks],
                      key=lambda item: item[:2])
    for _, is_tick, item in timeline:
        if is_tick:
            along.tick(item)
        else:
            along.process(item)
    along.tick(end)
    at_end = engine_for(text, events)
    at_end.tick(end)
    assert [(d.id, d.status) for d in along.decisions()] == \
        [(d.id, d.status) for d in at_end.decisions()]
    assert [along.level(c) for c in "ab"] == [at_end.level(c) for c in "ab"]


def _first_change(engine: Engine, customer: str) -> float:
    """When, with no new event, a level first fires or re-arms for ``customer``
    (searched in full, on a copy). A licence step that moves no level changes
    nothing a tick does: its points are banked at the next event."""
    import math

    from retention.capital import level_transitions
    from retention.snapshot import decode, encode

    c = decode(encode(engine._customers[customer]))
    if c.opened_at is None:
        return math.inf
    far = c.level_time + 20 * 365 * 86400.0
    moves = level_transitions(c, engine.rules, c.armed, c.level_time, far,
                              include_end=True)
    return min([at for at, _, _ in moves] + [math.inf])


@given(rule_files(), event_streams())
def test_the_schedule_is_never_late(text, events):
    """``next_change`` may come early (a tick then only plans again), never late: after
    every event, no level fires or re-arms for the customer before it."""
    engine = engine_for(text)
    for event in events:
        outcome = engine.process(event)
        if outcome.duplicate:
            continue
        customer = event["customer"]
        assert engine.next_change(customer) <= _first_change(engine, customer) + 1e-3


@st.composite
def _licence_and_silence(draw):
    """Rule files where the silence drain and traces at their floor settle into the
    balance while a level waits to re-arm, and the licence has room to bring it back."""
    initial = draw(st.integers(40, 90))
    return f"""
capital: {{initial: {initial}, min: 0, max: 100}}
rules:
  bought: {{when: event.type == "purchase", points: {draw(st.integers(1, 30))}}}
  late: {{when: event.type == "late", points: -{draw(st.integers(1, 30))},
          fades_over: {draw(st.integers(1, 40))}d, keep: {draw(st.sampled_from([0, 0.3, 0.6]))}}}
silence: {{after: {draw(st.integers(1, 20))}d, rate_per_day: {draw(st.integers(1, 3))},
           contacts: [purchase, ping, late]}}
licence: {{clean_for: {draw(st.integers(2, 20))}d, points: {draw(st.integers(1, 15))},
           up_to: {draw(st.integers(20, 90))}}}
levels:
  - {{name: watch, below: {draw(st.integers(20, 60))}, rearm: {draw(st.integers(0, 10))},
     then: [flag]}}
  - {{name: rupture, below: {draw(st.integers(1, 19))}, then: [flag]}}
actions:
  flag: {{kind: service, via: crm_tag}}
"""


@given(_licence_and_silence(), st.lists(st.tuples(
    st.sampled_from(["purchase", "ping", "late", "visit"]), st.integers(0, 30 * 24)),
    min_size=1, max_size=12), st.lists(st.integers(0, 400 * 24), max_size=3))
def test_the_schedule_is_never_late_with_the_licence_and_silence(text, steps, ticks):
    """The same, where settling an event (a contact banking the silence drain, or a
    trace paid into the balance at its floor) gives the licence room while a level
    waits to re-arm; ``visit`` is no contact. Ticks in between change nothing."""
    from datetime import UTC, datetime, timedelta

    start = datetime(2026, 1, 1, tzinfo=UTC)
    engine = engine_for(text)
    hour = 0
    timeline = []
    for i, (kind, gap) in enumerate(steps):
        hour += gap
        timeline.append((hour, 0, {"id": f"e{i}", "customer": "a", "type": kind,
                                   "at": (start + timedelta(hours=hour)).isoformat()}))
    timeline += [(h, 1, None) for h in ticks]
    for h, is_tick, event in sorted(timeline, key=lambda item: item[:2]):
        if is_tick:
            engine.tick((start + timedelta(hours=h)).isoformat())
            continue
        engine.process(event)
        assert engine.next_change("a") <= _first_change(engine, "a") + 1e-3
    # the same events without ticks decide the same, once ticked to the end
    alone = engine_for(text, [e for _, t, e in timeline if not t])
    end = (start + timedelta(hours=max(h for h, _, _ in timeline) + 24 * 400)).isoformat()
    engine.tick(end)
    alone.tick(end)
    assert [d.id for d in engine.decisions()] == [d.id for d in alone.decisions()]


@given(st.floats(50, 100), st.integers(1, 40 * 24), st.sampled_from([0.3, 0.5, 1, 2.5, 7]),
       st.integers(12, 30 * 24), st.sampled_from([0.1, 0.3, 1, 2.5, 7]),
       st.floats(50, 100), st.integers(0, 60 * 86_400_000), st.integers(0, 60 * 86_400_000),
       st.lists(st.tuples(st.floats(1, 30), st.integers(0, 30 * 86_400_000),
                          st.sampled_from([0, 0.3])), max_size=3))
def test_the_silence_firing_is_planned_never_late_and_exactly_without_traces(
        balance, after_hours, per_day, clean_hours, points, up_to, idle_ms, clean_ms, traces):
    """Planned through the licence steps to come, with traces fading meanwhile: never later
    than the first firing, and on its millisecond when no trace is left to fade. Times
    on the millisecond, at any distance from a contact and from a licence step."""
    import math

    from retention.capital import (
        CapitalState,
        capital_at,
        fading_penalty,
        level_transitions,
        licence_due,
        next_level_change,
    )
    from retention.times import DAY

    rules = engine_for(f"""
capital: {{initial: 70, min: 0, max: 100}}
silence: {{after: {after_hours}h, rate_per_day: {per_day}}}
licence: {{clean_for: {clean_hours}h, points: {points}, up_to: {up_to}}}
levels:
  - {{name: watch, below: 54.9, then: [flag]}}
actions:
  flag: {{kind: service, via: crm_tag}}
""").rules
    now = 1_767_225_600.123  # 2026-01-01, and a few milliseconds
    state = CapitalState(balance=balance, opened_at=now - 90 * DAY,
                         last_contact=now - idle_ms / 1000, clean_since=now - clean_ms / 1000)
    owed, state.steps = licence_due(state, rules, now)  # settled as an event would
    state.balance = min(100.0, state.balance + owed)
    state.penalties = tuple(fading_penalty(p, now - ago / 1000, ("L", 40 * DAY), keep, "x", "e")
                            for p, ago, keep in traces)
    assume(capital_at(state, rules, now) >= 54.9)  # else the level would not be armed
    due = next_level_change(state, rules, now, 54.9, math.inf)[1]
    moves = level_transitions(state, rules, bytearray(b"\x01"), now, now + 30 * 365 * DAY,
                              include_end=True)
    first = moves[0][0] if moves else math.inf
    assert due <= first
    steps = math.ceil(max(up_to - state.balance, 0) / points)
    if not traces and steps < 30 and first < math.inf:
        assert first - due < 0.0015  # the millisecond, or the one before


def test_a_contact_that_gives_the_licence_room_plans_the_re_arming_again():
    """``watch`` fires by silence while the balance is above the licence's ``up_to``;
    a contact banks the drain, so the licence re-arms ``watch`` at day 50 and silence
    fires it again: a tick must find both."""
    from datetime import UTC, datetime, timedelta

    def day(d):
        return (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=d)).isoformat()

    engine = engine_for("""
capital: {initial: 70, min: 0, max: 100}
rules:
  bought: {when: event.type == "purchase", points: 10}
silence: {after: 10d, rate_per_day: 1}
licence: {clean_for: 10d, points: 10}
levels:
  - {name: watch, below: 50, rearm: 5, then: [flag]}
actions:
  flag: {kind: service, via: crm_tag}
""", [{"id": "p", "customer": "a", "type": "purchase", "at": day(0)}])
    assert [d.rule for d in engine.tick(day(41))] == ["watch"]
    engine.process({"id": "q", "customer": "a", "type": "ping", "at": day(45)})
    assert engine.next_change("a") <= datetime.fromisoformat(day(50)).timestamp()
    again = engine.tick(day(90))
    assert [(d.rule, d.at.date().isoformat()) for d in again] == [("watch", "2026-03-17")]


@given(rule_files(), event_streams(), st.lists(moments(), min_size=1, max_size=4))
def test_the_explained_ledger_adds_up_to_the_capital_at_any_moment(text, events, times):
    engine = engine_for(text, events)
    for customer in ("a", "b"):
        for at in times:
            capital = engine.capital(customer, at=at)
            entries = engine.explain(customer, at=at)
            total = sum(e.points for e in entries)
            assert total == pytest.approx(0 if capital is None else capital, abs=1e-6)
            settled = [e for e in entries if e.settled]
            assert entries[:len(settled)] == settled  # what is not settled comes last


@given(rule_files(), event_streams(), moments())
def test_a_customer_as_of_a_moment_is_in_the_level_a_tick_leaves(text, events, at):
    engine = engine_for(text, events)
    past = {c: engine.as_of(c, at) for c in ("a", "b")}
    later = [e for e in events if e["at"] > at]
    ticked = engine_for(text, [e for e in events if e["at"] <= at])
    ticked.tick(at)
    for customer in ("a", "b"):
        if past[customer] is None:
            continue
        assert past[customer].level(engine.rules) == ticked.level(customer), later
