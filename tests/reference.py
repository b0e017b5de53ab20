"""A second implementation of the arithmetic, for differential tests: plain and slow.

It is written from docs/concepts.md (the formulas, "Processing one event", the
levels, recognition, pressure, consent), not from the engine, and shares no code
with ``retention``: a rule file is a :class:`Model` of plain values (the test
renders it to YAML for the engine), times are whole milliseconds, and every
quantity is recomputed from its formula whenever it is needed. Where the engine
plans ahead or searches cleverly, this replays events in time order and finds a
level's crossing by bisection on ``capital(t)`` itself.

Only one thing comes from outside: holdout membership (a stable hash, not
arithmetic) is a function the test passes in.

The tolerance at thresholds is the documented one (docs/concepts.md, "Ties at
thresholds"): capital within ``TIE`` of a threshold counts as on it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

DAY_MS = 86_400_000
NEGLIGIBLE = 1e-6  # a trace without a floor is forgotten below this many points
TIE = 1e-11  # relative: see tie()
MAX_MULTIPLIER = 1e12
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def tie(threshold: float) -> float:
    return TIE * max(1.0, abs(threshold))


# -- the rule file, as plain values ---------------------------------------------------

@dataclass(frozen=True)
class Fade:
    kind: str  # "over" (straight line), "half" (half-life) or "rate"
    ms: int  # the duration: over, half-life, or the rate's period
    rate: float = 0.0

    def share(self, elapsed_ms: int) -> float:
        if self.kind == "over":
            return max(0.0, 1.0 - elapsed_ms / self.ms)
        if self.kind == "half":
            return 2.0 ** (-elapsed_ms / self.ms)
        return (1.0 - self.rate) ** (elapsed_ms / self.ms)


@dataclass(frozen=True)
class Recovers:
    rule: str
    match: str
    within_ms: int
    refund: float = 1.0
    bonus: float = 0.0


@dataclass(frozen=True)
class Rule:
    name: str
    type: str
    points: float = 0.0
    capital_below: float | None = None  # the condition `customer.capital < N`
    fade: Fade | None = None
    keep: float = 0.0
    repeat: tuple[int, float] | None = None  # (within ms, factor)
    category: str | None = None
    then: tuple[str, ...] = ()
    recovers: Recovers | None = None


@dataclass(frozen=True)
class Level:
    name: str
    below: float
    rearm: float = 5.0
    then: tuple[str, ...] = ()
    holdout: float = 0.0


@dataclass(frozen=True)
class Every:
    name: str
    every: int
    type: str
    then: tuple[tuple[str, dict], ...]


@dataclass(frozen=True)
class After:
    name: str
    purchases: int | None
    spent: float | None
    within_ms: int | None
    then: tuple[tuple[str, dict], ...]


@dataclass(frozen=True)
class Model:
    initial: float
    low: float
    high: float
    rules: tuple[Rule, ...]
    levels: tuple[Level, ...]
    actions: dict  # name -> (kind, via)
    opens_on: tuple[str, ...] = ("purchase",)
    silence: tuple[int, float, tuple[str, ...] | None] | None = None  # (after ms, rate, contacts)
    licence: tuple[int, float, float | None] | None = None  # (clean_for ms, points, up_to)
    rewards: tuple[Every | After, ...] = ()
    pressure: tuple[int, int, tuple[str, ...]] | None = None  # (max, per ms, kinds)
    withdraw_on: tuple[str, ...] = ("unsubscribe",)
    restore_on: tuple[str, ...] = ("subscribe",)

    @property
    def up_to(self) -> float:
        assert self.licence is not None
        return self.initial if self.licence[2] is None else self.licence[2]


def duration(ms: int) -> str:
    for unit, size in (("d", DAY_MS), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    raise ValueError(f"{ms} ms is not a whole number of seconds")


def render(model: Model) -> str:
    """The model as the rule file the engine loads."""
    def names(items) -> str:
        return "[" + ", ".join(items) + "]"

    def ref(name: str, params: dict) -> str:
        if not params:
            return name
        return f"{{{name}: {{{', '.join(f'{k}: {v}' for k, v in params.items())}}}}}"

    def refs(then) -> str:
        return "[" + ", ".join(ref(name, params) for name, params in then) + "]"

    out = [f"capital: {{initial: {model.initial}, min: {model.low}, max: {model.high}, "
           f"opens_on: {names(model.opens_on)}}}", "rules:"]
    for r in model.rules:
        when = f'event.type == "{r.type}"'
        if r.capital_below is not None:
            when += f" and customer.capital < {r.capital_below}"
        keys = [f"when: {when}"]
        if r.points:
            keys.append(f"points: {r.points}")
        if r.fade is not None:
            keys.append({"over": f"fades_over: {duration(r.fade.ms)}",
                         "half": f"half_life: {duration(r.fade.ms)}",
                         "rate": f"fades: {{rate: {r.fade.rate}, per: {duration(r.fade.ms)}}}"
                         }[r.fade.kind])
            if r.keep:
                keys.append(f"keep: {r.keep}")
        if r.repeat is not None:
            keys.append(f"repeat: {{within: {duration(r.repeat[0])}, factor: {r.repeat[1]}}}")
        if r.category:
            keys.append(f"category: {r.category}")
        if r.then:
            keys.append(f"then: {names(r.then)}")
        if r.recovers is not None:
            rec = r.recovers
            keys.append(f"recovers: {rec.rule}, match: {rec.match}, "
                        f"within: {duration(rec.within_ms)}, refund: {rec.refund}, "
                        f"bonus: {rec.bonus}")
        out.append(f"  {r.name}: {{{', '.join(keys)}}}")
    if model.silence is not None:
        after, rate, contacts = model.silence
        extra = f", contacts: {names(contacts)}" if contacts is not None else ""
        out.append(f"silence: {{after: {duration(after)}, rate_per_day: {rate}{extra}}}")
    if model.licence is not None:
        clean_for, points, up_to = model.licence
        extra = f", up_to: {up_to}" if up_to is not None else ""
        out.append(f"licence: {{clean_for: {duration(clean_for)}, points: {points}{extra}}}")
    out.append("levels:")
    for lv in model.levels:
        out.append(f"  - {{name: {lv.name}, below: {lv.below}, rearm: {lv.rearm}, "
                   f"then: {names(lv.then)}, holdout: {lv.holdout}}}")
    if model.rewards:
        out.append("recognition:")
        for rw in model.rewards:
            if isinstance(rw, Every):
                out.append(f'  {rw.name}: {{every: {rw.every}, when: event.type == "{rw.type}", '
                           f"then: {refs(rw.then)}}}")
            else:
                keys = []
                if rw.purchases is not None:
                    keys.append(f"purchases: {rw.purchases}")
                if rw.spent is not None:
                    keys.append(f"or_spent: {rw.spent}")
                if rw.within_ms is not None:
                    keys.append(f"within: {duration(rw.within_ms)}")
                out.append(f"  {rw.name}: {{after: {{{', '.join(keys)}}}, then: {refs(rw.then)}}}")
    if model.pressure is not None:
        most, per, kinds = model.pressure
        out.append(f"pressure: {{max: {most}, per: {duration(per)}, kinds: {names(kinds)}}}")
    out.append(f"consent: {{withdraw_on: {names(model.withdraw_on)}, "
               f"restore_on: {names(model.restore_on)}}}")
    out.append("actions:")
    for name, (kind, via) in model.actions.items():
        out.append(f"  {name}: {{kind: {kind}" + (f", via: {via}" if via else "") + "}")
    return "\n".join(out) + "\n"


# -- one customer, replayed --------------------------------------------------------------

def instant(ms: int) -> str:
    """An instant on the millisecond grid as decision triggers write it."""
    moment = EPOCH + timedelta(milliseconds=ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass
class Trace:
    points: float
    t0: int
    fade: Fade
    keep: float
    rule: str
    state: str = "fading"  # then "paid" (its floor went into B) or "gone"

    def takes(self, t: int) -> float:
        """What the trace takes from capital at t (docs: max(keep, share) of P; a trace
        without a floor is forgotten once less than NEGLIGIBLE points of it remain)."""
        left = self.points * max(self.keep, self.fade.share(t - self.t0))
        if self.keep == 0 and left < NEGLIGIBLE:
            return 0.0
        return left

    def settled(self, t: int) -> bool:
        """Whether it stopped changing by t: at its floor, or forgotten."""
        if self.keep > 0:
            return self.fade.share(t - self.t0) <= self.keep
        return self.points * self.fade.share(t - self.t0) < NEGLIGIBLE


@dataclass
class Incident:
    rule: str
    at: int
    fields: dict
    trace: Trace | None
    lost: float  # what a permanent loss really took from B
    recovered_by: set = field(default_factory=set)  # the fields it was recovered through


@dataclass
class Person:
    id: str
    opened: int | None = None
    balance: float = 0.0
    last_contact: int = 0
    clean_since: int = 0
    steps: int = 0
    traces: list = field(default_factory=list)
    incidents: list = field(default_factory=list)
    matches: dict = field(default_factory=dict)  # rule -> times it matched
    armed: list = field(default_factory=list)
    fired: list = field(default_factory=list)
    level_time: int = 0
    consent: bool = True
    purchases: int = 0
    spent: float = 0.0
    counts: dict = field(default_factory=dict)
    baskets: dict = field(default_factory=dict)  # after-reward -> [(t, amount)]
    rewarded: set = field(default_factory=set)
    contacts: list = field(default_factory=list)  # times of decisions counting as pressure
    decided: dict = field(default_factory=dict)  # (cause, trigger, action) -> decision tuple
    ledger: list = field(default_factory=list)  # (rule, points, category, event id)
    seen: set = field(default_factory=set)  # what the story exercised (for statistics)


class Reference:
    """Customers replayed event by event, in time order."""

    def __init__(self, model: Model, holdout: Callable[[str, str, float], bool]):
        self.m = model
        self.holdout = holdout
        self.people: dict[str, Person] = {}

    # capital(t) = clamp(B + Lic(t) - T(t) - S(t), min, max)

    def licence_owed(self, p: Person, t: int) -> tuple[float, int]:
        if self.m.licence is None:
            return 0.0, p.steps
        clean_for, points, _ = self.m.licence
        n = (t - p.clean_since) // clean_for
        if n <= p.steps:
            return 0.0, p.steps
        room = self.m.up_to - p.balance
        return (min(points * (n - p.steps), room) if room > 0 else 0.0), n

    def silence_drain(self, p: Person, t: int) -> float:
        if self.m.silence is None:
            return 0.0
        after, rate, _ = self.m.silence
        return rate * max(0.0, (t - p.last_contact - after) / DAY_MS)

    def raw(self, p: Person, t: int) -> float:
        taken = sum(tr.takes(t) for tr in p.traces)
        return p.balance + self.licence_owed(p, t)[0] - taken - self.silence_drain(p, t)

    def ceiling(self, p: Person, a: int, b: int) -> float:
        """Capital over [a, b] is at most this: traces only shrink, silence only grows,
        the licence only gives."""
        taken = sum(tr.takes(b) for tr in p.traces)
        return p.balance + self.licence_owed(p, b)[0] - taken - self.silence_drain(p, a)

    def clamp(self, value: float) -> float:
        return min(max(value, self.m.low), self.m.high)

    def capital(self, customer: str, t: int) -> float | None:
        p = self.people.get(customer)
        if p is None or p.opened is None or t < p.opened:
            return None
        return self.clamp(self.raw(p, t))

    # processing one event (docs/concepts.md, "Processing one event")

    def process(self, ev: dict, t: int) -> tuple[float | None, float | None]:
        m = self.m
        p = self.people.setdefault(ev["customer"], Person(ev["customer"]))
        trigger = ev["id"]
        if p.opened is not None:
            self.time_moves(p, p.level_time, t - 1)  # strictly before the event
        if ev["type"] in m.withdraw_on:
            p.consent = False
        if ev["type"] in m.restore_on:
            p.consent = True
        if p.opened is None:
            if ev["type"] not in m.opens_on:
                return None, None
            p.opened = p.last_contact = p.clean_since = t
            p.balance = m.initial
            p.armed = [m.initial >= lv.below - tie(lv.below) for lv in m.levels]
            p.fired = [False] * len(m.levels)
            p.ledger.append(("opening", m.initial, "opening", ev["id"]))
            before = None
        else:
            self.settle(p, ev, t)
            before = self.clamp(self.raw(p, t))
            self.observe(p, before, t, trigger)
        seen = before if before is not None else m.initial
        for rule in m.rules:
            if rule.type != ev["type"]:
                continue
            if rule.capital_below is not None and not seen < rule.capital_below:
                continue
            self.apply(p, rule, ev, t)
            if rule.then:
                self.decide(p, rule.name, [(a, {}) for a in rule.then], t, trigger, 0.0)
        if ev["type"] == "purchase":
            p.purchases += 1
            p.spent += ev.get("amount", 0)
        self.recognise(p, ev, t, trigger)
        after = self.clamp(self.raw(p, t))
        self.observe(p, after, t, trigger)
        p.level_time = t
        return before, after

    def settle(self, p: Person, ev: dict, t: int) -> None:
        m = self.m
        owed, n = self.licence_owed(p, t)
        p.steps = n
        if owed:
            old = p.balance
            p.balance = self.clamp(old + owed)
            if p.balance != old:
                p.ledger.append(("licence", p.balance - old, "licence", ev["id"]))
                p.seen.add("the licence pays")
        contacts = m.silence[2] if m.silence is not None else None
        if contacts is None or ev["type"] in contacts:
            drain = self.silence_drain(p, t)
            if m.silence is not None:
                p.seen.add("a contact after the silence grace" if drain else
                           "a contact inside the silence grace")
            if drain:
                old = p.balance
                p.balance = self.clamp(old - drain)
                if p.balance != old:
                    p.ledger.append(("silence", p.balance - old, "silence", ev["id"]))
            p.last_contact = t
        for tr in list(p.traces):
            if tr.settled(t):
                old = p.balance
                if tr.keep > 0:
                    p.balance = self.clamp(old - tr.points * tr.keep)
                    tr.state = "paid"
                    p.seen.add("a keep floor paid in")
                else:
                    tr.state = "gone"
                p.traces.remove(tr)
                # the fading gave back the full points less what the balance keeps
                p.ledger.append((tr.rule, tr.points + p.balance - old, "fading", ev["id"]))

    def apply(self, p: Person, rule: Rule, ev: dict, t: int) -> None:
        points = rule.points
        if rule.repeat is not None:
            within, factor = rule.repeat
            times = p.matches.setdefault(rule.name, [])
            earlier = sum(1 for s in times if t - within <= s < t)
            if earlier:
                p.seen.add("a repeat costs more")
            points *= min(factor ** earlier, MAX_MULTIPLIER)
            times.append(t)
        category = rule.category or ("recovery" if rule.recovers else
                                     "incident" if points < 0 else "satisfaction")
        trace = None
        applied = points
        if points < 0 and rule.fade is not None:
            trace = Trace(-points, t, rule.fade, rule.keep, rule.name)
            p.traces.append(trace)
            p.ledger.append((rule.name, points, category, ev["id"]))
        elif points:
            old = p.balance
            p.balance = self.clamp(old + points)
            applied = p.balance - old
            p.ledger.append((rule.name, applied, category, ev["id"]))
        if points < 0:
            p.clean_since, p.steps = t, 0
            fields = {r.recovers.match: ev.get(r.recovers.match) for r in self.m.rules
                      if r.recovers is not None and r.recovers.rule == rule.name}
            p.incidents.append(Incident(rule.name, t, fields, trace, -applied))
        if rule.recovers is not None:
            self.recover(p, rule, category, ev, t)

    def recover(self, p: Person, rule: Rule, category: str, ev: dict, t: int) -> None:
        rec = rule.recovers
        value = ev.get(rec.match)
        if value is None:
            return
        same = [i for i in p.incidents if i.rule == rec.rule and i.fields.get(rec.match) == value]
        if not same:
            return
        incident = same[-1]  # the latest one with that value counts
        if rec.match in incident.recovered_by or t - incident.at > rec.within_ms:
            return
        incident.recovered_by.add(rec.match)
        p.seen.add("a recovery" + (" of a second field" if len(incident.recovered_by) > 1
                                   else ""))
        refund = 0.0
        tr = incident.trace
        if tr is not None and tr.state == "fading":
            left = tr.takes(t)
            refund = rec.refund * left
            faded = rec.refund * tr.points - refund  # the part of the refund time gave back
            if faded:
                p.ledger.append((tr.rule, faded, "fading", ev["id"]))
            tr.points *= 1.0 - rec.refund
            if tr.points <= 0:
                tr.state = "gone"
                p.traces.remove(tr)
        else:
            if tr is None:
                owed = incident.lost
                incident.lost *= 1.0 - rec.refund
            else:  # paid in at its floor (what it still holds), or gone (nothing)
                owed = tr.points * tr.keep if tr.state == "paid" else 0.0
                tr.points *= 1.0 - rec.refund
            old = p.balance
            p.balance = self.clamp(old + rec.refund * owed)
            refund = p.balance - old
        if refund:
            p.ledger.append((rule.name, refund, category, ev["id"]))
        if rec.bonus:
            old = p.balance
            p.balance = self.clamp(old + rec.bonus)
            p.ledger.append((rule.name, p.balance - old, category, ev["id"]))

    def recognise(self, p: Person, ev: dict, t: int, trigger: str) -> None:
        for rw in self.m.rewards:
            if isinstance(rw, Every):
                if ev["type"] != rw.type:
                    continue
                p.counts[rw.name] = count = p.counts.get(rw.name, 0) + 1
                if count % rw.every == 0:
                    p.seen.add("a recognition every n-th")
                    self.decide(p, rw.name, rw.then, t, trigger, 0.0, {"count": count})
                continue
            if ev["type"] != "purchase" or rw.name in p.rewarded:
                continue
            basket = p.baskets.setdefault(rw.name, [])
            basket.append((t, ev.get("amount", 0)))
            if rw.within_ms is not None:
                basket[:] = [(s, a) for s, a in basket if s > t - rw.within_ms]
            count, total = len(basket), sum(a for _, a in basket)
            if (rw.purchases is not None and count >= rw.purchases) or (
                    rw.spent is not None and total >= rw.spent - tie(rw.spent)):
                p.rewarded.add(rw.name)
                p.seen.add("a recognition after purchases or spending")
                self.decide(p, rw.name, rw.then, t, trigger, 0.0,
                            {"purchases": count, "spent": total})

    # levels

    def observe(self, p: Person, value: float, t: int, trigger: str) -> None:
        for i, lv in enumerate(self.m.levels):
            if p.armed[i]:
                if value < lv.below - tie(lv.below):
                    p.armed[i], p.fired[i] = False, True
                    p.seen.add("a level fired by an event")
                    self.decide(p, lv.name, [(a, {}) for a in lv.then], t, trigger, lv.holdout)
            elif value >= lv.below + lv.rearm - tie(lv.below + lv.rearm):
                p.armed[i], p.fired[i] = True, False
                p.seen.add("a level re-armed by an event")

    def level(self, customer: str) -> str | None:
        p = self.people.get(customer)
        fired = [lv for i, lv in enumerate(self.m.levels) if p and p.opened is not None
                 and p.fired[i]]
        return min(fired, key=lambda lv: lv.below).name if fired else None

    def moves_until(self, customer: str, t: int) -> list[tuple[int, int, str]]:
        """What time alone does to the levels after the customer's last event, up to
        ``t`` included: (time, level index, fire|rearm) in time order, the customer
        left as it was."""
        p = copy.deepcopy(self.people[customer])
        return self.time_moves(p, p.level_time, t)

    def pieces(self, p: Person, lo: int, hi: int) -> list[tuple[int, int]]:
        """[lo, hi] cut where capital jumps up (a licence step, a trace forgotten):
        between those, capital before clamping is concave in time."""
        cuts = set()
        if self.m.licence is not None:
            clean_for = self.m.licence[0]
            k = (lo - p.clean_since) // clean_for + 1
            while p.clean_since + k * clean_for <= hi:
                cuts.add(p.clean_since + k * clean_for)
                k += 1
        for tr in p.traces:
            if tr.keep == 0 and tr.takes(hi) == 0.0 and tr.takes(lo) > 0.0:
                cuts.add(first(lambda s, tr=tr: tr.takes(s) == 0.0, lo, hi))
        bounds = sorted(c for c in cuts if lo < c <= hi)
        starts = [lo, *bounds]
        ends = [b - 1 for b in bounds] + [hi]
        return list(zip(starts, ends, strict=True))

    def time_moves(self, p: Person, after: int, until: int) -> list[tuple[int, int, str]]:
        """Fire and re-arm what time alone did in (after, until], each level on its own,
        then decide in time order; the moves, in that order."""
        lo, hi = after + 1, until
        if hi < lo or not self.m.levels:
            return []
        pieces = self.pieces(p, lo, hi)
        moves = []
        for i, lv in enumerate(self.m.levels):
            armed = p.armed[i]
            start = lo
            while True:
                at = self.first_move(p, lv, armed, pieces, start)
                if at is None:
                    break
                moves.append((at, i, "fire" if armed else "rearm"))
                armed = not armed
                start = at + 1
        for at, i, kind in sorted(moves):
            lv = self.m.levels[i]
            p.seen.add(f"a level {'fired' if kind == 'fire' else 're-armed'} by time")
            if kind == "fire":
                p.armed[i], p.fired[i] = False, True
                self.decide(p, lv.name, [(a, {}) for a in lv.then], at, "time:" + instant(at),
                            lv.holdout)
            else:
                p.armed[i], p.fired[i] = True, False
        return sorted(moves)

    def first_move(self, p: Person, lv: Level, armed: bool, pieces, start: int) -> int | None:
        if armed:
            edge = lv.below - tie(lv.below)

            def moved(s: int) -> bool:
                return self.clamp(self.raw(p, s)) < edge
        else:
            target = lv.below + lv.rearm
            edge = target - tie(target)

            def moved(s: int) -> bool:
                return self.clamp(self.raw(p, s)) >= edge
        for a, b in pieces:
            a = max(a, start)
            if a > b:
                continue
            if moved(a):
                return a
            if armed:
                # {capital >= edge} is an interval holding a: it ends before b, or never
                if moved(b):
                    return first(moved, a, b)
            elif self.clamp(self.ceiling(p, a, b)) >= edge:
                top = peak(lambda s: self.raw(p, s), a, b)
                if moved(top):
                    return first(moved, a, top)
        return None

    # decisions: holdout, consent, pressure

    def decide(self, p: Person, cause: str, refs, t: int, trigger: str, holdout: float,
               extra: dict | None = None) -> None:
        held = self.holdout(p.id, cause, holdout)
        for action, params in refs:
            key = (cause, trigger, action)
            if key in p.decided:
                continue
            kind = self.m.actions[action][0]
            status, reason = "pending", None
            if held:
                status, reason = "held_out", "holdout"
            elif kind == "marketing" and not p.consent:
                status, reason = "suppressed", "consent"
            elif self.m.pressure is not None and kind in self.m.pressure[2]:
                most, per, _ = self.m.pressure
                if sum(1 for s in p.contacts if t - per < s <= t) >= most:
                    status, reason = "suppressed", "pressure"
                else:
                    p.contacts.append(t)
            p.seen.add(f"a decision {status}" + (f" ({reason})" if reason else ""))
            if cause in {lv.name for lv in self.m.levels} and any(
                    k[0] == cause and k[1] != trigger for k in p.decided):
                p.seen.add("a level fired again after re-arming")
            p.decided[key] = (cause, action, trigger, t, status, reason,
                              tuple(sorted({**(extra or {}), **params}.items())))

    def finish(self, customer: str, until: int) -> None:
        """What time did after the last event, up to ``until`` included (a tick)."""
        p = self.people.get(customer)
        if p is not None and p.opened is not None and until > p.level_time:
            self.time_moves(p, p.level_time, until)
            p.level_time = until

    def next_move(self, customer: str, until: int) -> int | None:
        """The first millisecond after the last update, up to ``until``, at which a level
        would fire or re-arm, or a licence step would raise capital (None: none)."""
        p = self.people[customer]
        lo = p.level_time + 1
        if p.opened is None or until < lo:
            return None
        pieces = self.pieces(p, lo, until)
        found = [at for i, lv in enumerate(self.m.levels)
                 if (at := self.first_move(p, lv, p.armed[i], pieces, lo)) is not None]
        if self.m.licence is not None:
            found += [a for a, _ in pieces[1:]
                      if self.licence_owed(p, a)[0] > self.licence_owed(p, a - 1)[0]][:1]
        return min(found) if found else None


def first(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """The smallest s in [lo, hi] with pred(s), for pred false then true (pred(hi) holds)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def peak(f: Callable[[int], float], lo: int, hi: int) -> int:
    """Where a concave f is highest on [lo, hi]: the first s at which it stops rising
    (bisection on its slope, which only falls)."""
    return first(lambda s: s == hi or f(s) >= f(s + 1), lo, hi)
