"""The engine against an independent reference model (tests/reference.py).

Generated rule files and customers' stories go through both; they must agree on
every outcome's capital before and after, the capital between events, the
ledger, each decision (cause, action, trigger, time to the millisecond, status,
parameters), what time does to the levels between events (each firing and re-arming,
to the millisecond), the level, and the plan (``next_change`` never later than the
first thing time would really do).
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st

from retention import Engine, load_texts
from retention.capital import level_transitions
from retention.engine import in_holdout

from .reference import DAY_MS, Reference, instant, render
from .strategies import random_model, random_stories

START_MS = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000)
CUSTOMERS = 50  # per example: the ci profile's 200 examples make 10,000 customers
CLOSE = 1e-6  # points: a forgotten trace may leave this much in one and not the other


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def _decision(d) -> tuple:
    return (d.rule, d.action, d.trigger, _ms(d.at), d.status, d.reason,
            tuple(sorted(d.params.items())))


def _event(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k != "t"}


class Run:
    """One rule file and its customers through the engine and the reference."""

    def __init__(self, rng, seed: int):
        self.model = random_model(rng)
        self.text = render(self.model)
        rng = random.Random(seed)  # (stories of 50 customers are too big to shrink)
        self.events = random_stories(rng, CUSTOMERS, START_MS)
        self.engine = Engine(load_texts([("model.yaml", self.text)]))
        self.ref = Reference(self.model, in_holdout)
        self.rng = rng

    def story(self, customer: str) -> str:
        lines = [f"  {_event(e)}" for e in self.events if e["customer"] == customer]
        return f"rule file:\n{self.text}\nevents of {customer}:\n" + "\n".join(lines)

    def same_moves(self, cid: str, engine: list, model: list) -> bool:
        """The same firings and re-armings at the same milliseconds, but for a tie: a
        move one millisecond apart where the model's capital is within CLOSE of the
        level's threshold (a trace of exactly NEGLIGIBLE points forgotten at that
        millisecond in one and the next in the other, as float rounding decides)."""
        if len(engine) != len(model):
            return False
        for (t1, i1, k1), (t2, i2, k2) in zip(engine, model, strict=True):
            if (i1, k1) != (i2, k2) or abs(t1 - t2) > 1:
                return False
            if t1 != t2:
                level = self.model.levels[i1]
                edge = level.below if k1 == "fire" else level.below + level.rearm
                if abs(self.ref.capital(cid, min(t1, t2)) - edge) > CLOSE:
                    return False
        return True

    def same_decisions(self, cid: str, engine: list, model: list) -> bool:
        """The same decisions, but for a tie: a level fired by time one millisecond
        apart where capital is within CLOSE of the level (capital crosses the tie
        tolerance's window below the level within that millisecond, and float
        rounding of two ways of summing the same terms decides which side)."""
        if len(engine) != len(model):
            return False
        levels = {lv.name: lv for lv in self.model.levels}
        for mine, theirs in zip(engine, model, strict=True):
            if mine == theirs:
                continue
            (cause, action, trigger, t1, *rest), (cause2, action2, trigger2, t2, *rest2) = \
                mine, theirs
            if (cause, action, rest) != (cause2, action2, rest2) or cause not in levels or \
                    not trigger.startswith("time:") or trigger2 != "time:" + instant(t2) or \
                    abs(t1 - t2) != 1:
                return False
            at = self.engine.capital(cid, at=instant(min(t1, t2)))
            if abs(at - levels[cause].below) > CLOSE:
                return False
        return True

    def check(self) -> Counter:
        engine, ref, rng = self.engine, self.ref, self.rng
        made: dict[str, list] = {}
        previous: dict[str, int] = {}
        for ev in self.events:
            cid, t = ev["customer"], ev["t"]
            if cid in previous and rng.random() < 0.3:  # capital between two events
                s = rng.randint(previous[cid], t - 1)
                at = datetime.fromtimestamp(s / 1000, UTC).isoformat(timespec="milliseconds")
                assert engine.capital(cid, at=at) == pytest.approx(
                    ref.capital(cid, s), abs=CLOSE), f"capital at {at}\n{self.story(cid)}"
                if ref.capital(cid, s) is not None:  # what time did to the levels by then
                    last = engine.as_of(cid, instant(previous[cid]))
                    moves = level_transitions(last, engine.rules, bytearray(last.armed),
                                              last.level_time, s / 1000, include_end=True)
                    assert self.same_moves(cid, [(round(t * 1000), i, kind) for t, i, kind
                                                 in moves], ref.moves_until(cid, s)), (
                        f"levels until {at}\n{self.story(cid)}")
            out = engine.process(_event(ev))
            before, after = ref.process(ev, t)
            assert out.capital_before == pytest.approx(before, abs=CLOSE), (
                f"event {ev['id']}\n{self.story(cid)}")
            assert out.capital_after == pytest.approx(after, abs=CLOSE), (
                f"event {ev['id']}\n{self.story(cid)}")
            made.setdefault(cid, []).extend(_decision(d) for d in out.decisions)
            previous[cid] = t
        last = max(e["t"] for e in self.events)
        plans = {cid: engine.next_change(cid) for cid in made}
        truths = {cid: ref.next_move(cid, last + 400 * DAY_MS) for cid in made}
        horizon = last + 120 * DAY_MS
        for d in engine.tick(datetime.fromtimestamp(horizon / 1000, UTC)):
            made[d.customer].append(_decision(d))
        seen: Counter = Counter()
        for cid in made:
            ref.finish(cid, horizon)
            p = ref.people[cid]
            where = self.story(cid)
            truth = truths[cid]
            if truth is not None:
                p.seen.add("the plan met a real change")
            assert plans[cid] <= (truth + 1) / 1000 if truth is not None else True, (
                f"planned {plans[cid]}, first change at {truth / 1000}\n{where}")
            assert self.same_decisions(cid, sorted(made[cid]), sorted(p.decided.values())), (
                where)
            ledger = [(e.rule, e.category, e.event_id, e.points) for e in engine.explain(cid)]
            model = [(r, c, i, x) for r, x, c, i in p.ledger]
            shown = "\n".join(f"  engine {a}\n  model  {b}" for a, b in
                               zip(ledger, model, strict=False) if a[:3] != b[:3]
                               or abs(a[3] - b[3]) > CLOSE) + f"\n ({len(ledger)} vs {len(model)})"
            assert [x[:3] for x in ledger] == [(r, c, i) for r, _, c, i in p.ledger], (
                f"{shown}\n{where}")
            assert [x[3] for x in ledger] == pytest.approx(
                [x for _, x, _, _ in p.ledger], abs=CLOSE), f"{shown}\n{where}"
            assert engine.level(cid) == ref.level(cid), where
            seen.update(p.seen)
        return seen


@pytest.mark.parametrize("seed", range(3))
def test_the_reference_agrees_on_fixed_seeds(seed):
    Run(random.Random(seed), seed).check()


@given(st.integers(0, 2**64), st.integers(0, 2**64))
@settings(phases=[Phase.explicit, Phase.reuse, Phase.generate])  # (the message narrows it)
def test_the_engine_agrees_with_the_reference_model(model_seed, seed):
    """At the ci profile: 200 rule files of 50 customers each, 10,000 customers."""
    for name in sorted(Run(random.Random(model_seed), seed).check()):
        event(name)


#: the least share of examples (a rule file and its 50 customers) in which each
#: behaviour occurs; measured on seeds 0-99 (the test prints the shares)
REACHED = {
    "a contact after the silence grace": 0.6, "a contact inside the silence grace": 0.6,
    "a decision held_out (holdout)": 0.2, "a decision pending": 0.9,
    "a decision suppressed (consent)": 0.5, "a decision suppressed (pressure)": 0.3,
    "a keep floor paid in": 0.5, "a level fired again after re-arming": 0.5,
    "a level fired by an event": 0.6, "a level fired by time": 0.5,
    "a level re-armed by an event": 0.5, "a level re-armed by time": 0.3,
    "a recognition after purchases or spending": 0.6, "a recognition every n-th": 0.9,
    "a recovery": 0.6, "a recovery of a second field": 0.15, "a repeat costs more": 0.4,
    "the licence pays": 0.5,
}


def test_the_stories_reach_the_behaviour(capsys):
    """Every story opens its customer; each behaviour the comparison is there to check
    occurs in a large share of the generated examples."""
    shares: Counter = Counter()
    for seed in range(100):
        model = random_model(random.Random(seed))
        ref = Reference(model, in_holdout)
        events = random_stories(random.Random(seed), CUSTOMERS, START_MS)
        for ev in events:
            ref.process(ev, ev["t"])
        assert all(p.opened is not None for p in ref.people.values())
        shares.update(set().union(*(p.seen for p in ref.people.values())))
    with capsys.disabled():
        print("\nshare of examples reaching each behaviour:")
        for name in sorted(shares):
            print(f"  {shares[name]:3d}%  {name}")
    short = {name: shares[name] / 100 for name, least in REACHED.items()
             if shares[name] / 100 < least}
    assert not short, short

