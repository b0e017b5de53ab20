"""The arithmetic of tolerance capital (docs/concepts.md, "Capital at time t" to
"Points licence"), pure: no I/O, no clock.

Capital at time ``t`` is computed lazily from a small settled state::

    capital(t) = clamp(B + Lic(t) - T(t) - S(t), min, max)

``B`` is the settled balance, ``T`` the fading penalties still remembered, ``S``
the silence drain since the last contact, ``Lic`` the points licence earned since
the last incident. Between events and licence steps, ``capital(t)`` before
clamping is concave in time, so a level is crossed downward at most once there;
:func:`level_transitions` finds those crossings exactly, on the millisecond grid
(the first millisecond at which capital is below the level), by bisection.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from .models import pickled_as_tuple
from .times import DAY

if TYPE_CHECKING:
    from .rules.model import RuleSet

#: A remaining trace below this many points is forgotten (exponential fades never
#: reach zero on their own).
NEGLIGIBLE = 1e-6

FIRE, REARM = "fire", "rearm"

#: Ties at thresholds: a value within this share of a threshold (and within this many
#: points of one under 1) counts as on it. Rule files of whole numbers land on
#: thresholds exactly (150 - 12 - 48 + 10 = 100) where float rounding may leave
#: 99.99999999999997; the tolerance decides those as the arithmetic says. It is
#: ten thousand times float rounding at 100 points, and a drain of 1 point a day
#: takes 0.1 ms to cross the 1e-9 points it gives at 100.
TIE = 1e-11


def tie(threshold: float) -> float:
    """How far short of ``threshold`` a value still counts as at it."""
    return TIE * max(1.0, abs(threshold))


#: How the memory of an incident fades, as plain values: ``("L", over)`` (in a
#: straight line, gone after ``over`` seconds), ``("H", half_life)`` or
#: ``("R", rate, per)`` (loses ``rate`` of itself every ``per``). Penalties carry it.
FadeKey = tuple[Any, ...]


def share_left(fade: FadeKey, elapsed: float) -> float:
    """The share of a trace left ``elapsed`` seconds after it was taken."""
    kind = fade[0]
    if kind == "L":
        left = 1.0 - elapsed / fade[1]
        return left if left > 0.0 else 0.0
    if kind == "H":
        return 2.0 ** (-elapsed / fade[1])
    return (1.0 - fade[1]) ** (elapsed / fade[2])


def reaches(fade: FadeKey, share: float) -> float:
    """Seconds after which the share left is down to ``share`` (inf: never)."""
    kind = fade[0]
    if kind == "L":
        return fade[1] * (1.0 - share)
    if kind == "H":
        return math.inf if share <= 0 else fade[1] * math.log2(1.0 / share)
    rate, per = fade[1], fade[2]  # (0 < rate < 1: the loader refuses other rates)
    if share <= 0:
        return math.inf
    return per * math.log(share) / math.log(1.0 - rate)


class Fade(Protocol):
    """A rule's fade, as the rule file gives it."""

    @property
    def key(self) -> FadeKey: ...

    def describe(self) -> str: ...


@attrs.frozen
class LinearFade:
    """``fades_over: D``: the trace falls in a straight line and is gone after D."""

    over: float

    @property
    def key(self) -> FadeKey:
        return ("L", self.over)

    def describe(self) -> str:
        return f"fades over {self.over / DAY:g} days"


@attrs.frozen
class HalfLifeFade:
    """``half_life: H``: the trace halves every H."""

    half_life: float

    @property
    def key(self) -> FadeKey:
        return ("H", self.half_life)

    def describe(self) -> str:
        return f"half-life {self.half_life / DAY:g} days"


@attrs.frozen
class RateFade:
    """``fades: {rate: 5%, per: 30d}``: the trace loses ``rate`` of itself every ``per``."""

    rate: float
    per: float

    @property
    def key(self) -> FadeKey:
        return ("R", self.rate, self.per)

    def describe(self) -> str:
        return f"fades {self.rate * 100:g}% every {self.per / DAY:g} days"


#: A fading penalty, ``(points, t0, fade, keep, rule, event, settles_at)``:
#: ``points`` taken at ``t0``, remembered at ``max(keep, share left)``, the trace
#: unchanging from ``settles_at`` on (at its keep floor, or negligible); ``event``
#: names the event that took them (its id, with its source if any). A plain
#: tuple, as snapshots write it: Python's cycle collector stops walking a tuple of
#: plain values, where it would walk an object at every full collection.
PenaltyRow = tuple[float, float, FadeKey, float, str, str, float]


def fading_penalty(points: float, t0: float, fade: FadeKey, keep: float, rule: str,
                   event: str) -> PenaltyRow:
    if points <= 0:
        settles_at = t0
    else:
        floor = keep if keep > 0 else NEGLIGIBLE / points
        settles_at = t0 + reaches(fade, min(floor, 1.0))
    return (points, t0, fade, keep, rule, event, settles_at)


def remaining(penalty: PenaltyRow, t: float) -> float:
    """The points a penalty still takes at ``t``: from ``settles_at`` on, its keep
    floor (nothing, for a trace without one: it is forgotten then, whether or not
    an event has settled it yet)."""
    points, t0, fade, keep, _, _, settles_at = penalty
    if t >= settles_at:
        return points * keep
    share = share_left(fade, t - t0)
    return points * (share if share > keep else keep)


@pickled_as_tuple
@attrs.define(slots=True)
class Penalty:
    """A fading penalty as snapshots pickled it before penalties were plain tuples
    (kept so that those snapshots still load: see :meth:`row`)."""

    points: float
    t0: float
    fade: Any
    keep: float
    rule: str
    event_id: str
    settles_at: float

    def row(self) -> PenaltyRow:
        return (self.points, self.t0, self.fade.key, self.keep, self.rule, self.event_id,
                self.settles_at)


class Capital(Protocol):
    """The settled state of one customer's capital (all derivable by replay): what
    the functions below read and settle. The engine's customers hold it themselves;
    :class:`CapitalState` holds it alone."""

    balance: float
    opened_at: float
    last_contact: float
    clean_since: float
    steps: int
    penalties: tuple[PenaltyRow, ...]


@pickled_as_tuple
@attrs.define(slots=True)
class CapitalState:
    """The settled state of one customer's capital, on its own (see :class:`Capital`)."""

    balance: float
    opened_at: float
    last_contact: float
    clean_since: float
    steps: int = 0
    penalties: tuple[PenaltyRow, ...] = ()


def clamp(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


def licence_due(state: Capital, rules: RuleSet, t: float) -> tuple[float, int]:
    """Points the licence owes at ``t`` and the step count they settle to."""
    licence = rules.licence
    if licence is None:
        return 0.0, state.steps
    steps = int((t - state.clean_since) // licence.clean_for)
    if steps <= state.steps:
        return 0.0, state.steps
    room = licence.up_to - state.balance
    if room <= 0:
        return 0.0, steps
    owed = licence.points * (steps - state.steps)
    return (owed if owed < room else room), steps


def silence_due(state: Capital, rules: RuleSet, t: float) -> float:
    silence = rules.silence
    if silence is None or silence.rate_per_day <= 0:
        return 0.0
    idle = (t - state.last_contact - silence.after) / DAY
    return silence.rate_per_day * idle if idle > 0 else 0.0


def traces(state: Capital, t: float) -> float:
    """``T(t)``: the points the penalties still take at ``t``."""
    return sum(remaining(penalty, t) for penalty in state.penalties)


def raw_capital(state: Capital, rules: RuleSet, t: float) -> float:
    """``B + Lic(t) - T(t) - S(t)``, before clamping (the hot path: written out flat)."""
    value = balance = state.balance
    licence = rules.licence
    if licence is not None:
        steps = int((t - state.clean_since) // licence.clean_for)
        if steps > state.steps:
            room = licence.up_to - balance
            if room > 0:
                owed = licence.points * (steps - state.steps)
                value += owed if owed < room else room
    silence = rules.silence
    if silence is not None:
        idle = t - state.last_contact - silence.after
        if idle > 0:
            value -= silence.rate_per_day * idle / DAY
    for points, t0, fade, keep, _, _, settles_at in state.penalties:
        if t >= settles_at:
            value -= points * keep  # (nothing for a forgotten trace: see remaining())
            continue
        share = share_left(fade, t - t0)
        value -= points * (share if share > keep else keep)
    return value


def capital_at(state: Capital, rules: RuleSet, t: float) -> float:
    cap = rules.capital
    return clamp(raw_capital(state, rules, t), cap.min, cap.max)


def settle(state: Capital, rules: RuleSet, t: float, contact: bool
           ) -> tuple[float, float, tuple[tuple[PenaltyRow, float], ...], float]:
    """Step 2 of processing: bank the licence, the silence drain (at a contact) and
    penalties that no longer change (a faded one is dropped, one at its keep floor
    is paid into B). Leaves ``capital_at(t)`` as it was; returns the licence points
    and the silence drain banked (what the bounds let through), each settled
    penalty with the points its fading gave back (the ledger took all of it when it
    was taken; the balance takes only what is kept for good), and
    ``capital_at(t)`` itself."""
    cap = rules.capital
    low, high = cap.min, cap.max
    banked = 0.0
    if rules.licence is not None:
        owed, state.steps = licence_due(state, rules, t)
        if owed:
            old = state.balance
            state.balance = clamp(old + owed, low, high)
            banked = state.balance - old
    drained = 0.0
    if contact:
        drain = silence_due(state, rules, t)
        if drain:
            old = state.balance
            state.balance = clamp(old - drain, low, high)
            drained = old - state.balance
        state.last_contact = t
    faded: tuple[tuple[PenaltyRow, float], ...] = ()
    for penalty in state.penalties:
        if penalty[6] <= t:  # (settles_at) a new tuple only then
            kept, gone = [], []
            for other in state.penalties:
                points, _, _, keep, _, _, settles_at = other
                if settles_at > t:
                    kept.append(other)
                    continue
                old = state.balance
                if keep > 0:
                    state.balance = clamp(old - points * keep, low, high)
                gone.append((other, points + state.balance - old))
            state.penalties = tuple(kept)
            faded = tuple(gone)
            break
    return banked, drained, faded, capital_at(state, rules, t)


def unsettled(state: Capital, rules: RuleSet, t: float
              ) -> tuple[float, int, float, tuple[tuple[PenaltyRow, float], ...], float]:
    """What time did by ``t`` that the settled state does not hold yet, term by term
    of ``capital(t)``: the licence points owed and their steps, the silence drain,
    each fading penalty with the points its fading gave back so far, and what the
    clamp to ``[min, max]`` cuts off. Added to the balance, less the penalties'
    full points, they give ``capital_at(t)``."""
    owed, steps = licence_due(state, rules, t)
    drain = silence_due(state, rules, t)
    faded = tuple((p, p[0] - remaining(p, t)) for p in state.penalties)
    raw = raw_capital(state, rules, t)
    cap = rules.capital
    return owed, steps, drain, faded, clamp(raw, cap.min, cap.max) - raw


# -- time-driven level crossings -----------------------------------------------------

def _licence_steps(state: Capital, rules: RuleSet, t_from: float, t_to: float) -> list[float]:
    """Times in (t_from, t_to] at which the licence raises capital."""
    licence = rules.licence
    if licence is None:
        return []
    owed, steps = licence_due(state, rules, t_from)
    room = licence.up_to - state.balance - owed
    times: list[float] = []
    k = steps + 1
    while room > 0:
        at = state.clean_since + k * licence.clean_for
        if at > t_to:
            break
        times.append(at)
        room -= licence.points
        k += 1
    return times


def _crossing(value: Callable[[int], float], level: float, lo: int, hi: int, *,
              falling: bool) -> int:
    """The first m in (lo, hi] where ``value`` has crossed ``level`` (gone below it when
    ``falling``, reached it otherwise), given it has at ``hi``, not at ``lo``, and the
    value is monotone and concave in between.

    Regula falsi on the millisecond grid: on a concave piece the chord is a close
    guess that never jumps past the answer from the safe side; the two milliseconds
    around it are probed, and a bisection step is taken whenever the chord fails to
    halve the bracket, so it never takes more steps than plain bisection.
    """

    def crossed(v: float) -> bool:
        return v < level if falling else v >= level

    v_lo, v_hi = value(lo), value(hi)
    use_chord = True
    while hi - lo > 1:
        width = hi - lo
        if use_chord and v_lo != v_hi:
            guess = lo + (v_lo - level) / (v_lo - v_hi) * width
            m = min(max(math.floor(guess), lo + 1), hi - 1)
        else:
            m = (lo + hi) // 2
        v_m = value(m)
        if crossed(v_m):
            hi, v_hi = m, v_m
        else:
            lo, v_lo = m, v_m
            if m + 1 < hi:
                v_next = value(m + 1)
                if crossed(v_next):
                    return m + 1
                lo, v_lo = m + 1, v_next
        use_chord = (hi - lo) * 2 <= width
    return hi


def _first_at_least(value: Callable[[int], float], target: float, lo: int, hi: int
                    ) -> int | None:
    """Smallest m in [lo, hi] with value(m) >= target, for a concave value (None: none).

    A concave function rises then falls, so "falling from m on" is monotone in m:
    bisect on it for the peak, stopping as soon as a point reaches the target.
    """
    start = value(lo)
    if start >= target:
        return lo
    if lo == hi or value(lo + 1) <= start:
        return None  # concave and not rising at lo: it never rises again
    left, right = lo, hi
    found = None
    while left < right:
        mid = (left + right) // 2
        here, after = value(mid), value(mid + 1)
        if here >= target:
            found = mid
            break
        if after >= target:
            found = mid + 1
            break
        if here < after:
            left = mid + 1
        else:
            right = mid
    if found is None:
        if value(left) < target:
            return None
        found = left
    return _crossing(value, target, lo, found, falling=False)


def level_transitions(
    state: Capital,
    rules: RuleSet,
    armed: bytearray,
    t_from: float,
    t_to: float,
    *,
    include_end: bool,
) -> list[tuple[float, int, str]]:
    """Levels that time alone fires or re-arms in ``(t_from, t_to)`` (``t_to`` included
    when ``include_end``), as (time, level index, FIRE|REARM) in time order.

    Candidate times are the whole milliseconds of the interval, so the result is
    the same whether the interval is searched at once or in pieces. ``armed`` is
    updated in place.
    """
    levels = rules.levels
    if not levels:
        return []
    cap = rules.capital
    m_lo = math.floor(t_from * 1000.0) + 1
    m_hi = math.floor(t_to * 1000.0) if include_end else math.ceil(t_to * 1000.0) - 1
    if m_hi < m_lo:
        return []

    # The common case, answered without the search below: every level armed and no
    # licence step in between, so capital is concave all along and no level fires
    # while capital ends at or above the highest of them.
    licence = rules.licence
    forgotten = [p[6] for p in state.penalties if p[3] == 0 and t_from < p[6] <= t_to]
    if all(armed) and not forgotten and (
            licence is None or (t_from - state.clean_since) // licence.clean_for
            == (t_to - state.clean_since) // licence.clean_for) and clamp(
            raw_capital(state, rules, m_hi / 1000.0), cap.min, cap.max) >= max(
            level.fires_below for level in levels):
        return []

    def raw(m: int) -> float:
        return raw_capital(state, rules, m / 1000.0)

    def capital(m: int) -> float:
        return clamp(raw(m), cap.min, cap.max)

    # capital jumps up at a licence step and where a trace without a floor is
    # forgotten: concave between those
    bounds = [m_lo]
    for jump in sorted([*_licence_steps(state, rules, t_from, t_to), *forgotten]):
        m = math.ceil(jump * 1000.0)
        if bounds[-1] < m <= m_hi:
            bounds.append(m)
    bounds.append(m_hi + 1)

    def ceiling(a: int, b: int) -> float:
        """An upper bound of capital over [a, b]: traces only shrink, silence only grows."""
        t_a, t_b = a / 1000.0, b / 1000.0
        return (state.balance + licence_due(state, rules, t_b)[0] - traces(state, t_b)
                - silence_due(state, rules, t_a))

    found: list[tuple[float, int, str]] = []
    for a, b_next in itertools.pairwise(bounds):
        b = b_next - 1
        if b < a:
            continue
        end_value = capital(b)
        for index, level in enumerate(levels):
            start = a
            if not armed[index]:
                target = level.rearms_at
                if clamp(ceiling(a, b), cap.min, cap.max) < target:
                    continue
                rise = _first_at_least(raw, target, start, b)
                if rise is None:
                    continue
                start = rise
                found.append((start / 1000.0, index, REARM))
                armed[index] = True
            if end_value >= level.fires_below:
                continue  # concave: at or above the level at both ends, so all along
            hit = start if raw(start) < level.fires_below else _crossing(
                raw, level.fires_below, start, b, falling=True)
            found.append((hit / 1000.0, index, FIRE))
            armed[index] = False
    found.sort(key=lambda item: (item[0], item[1]))
    return found


def next_level_change(
    state: Capital, rules: RuleSet, t: float, highest: float, rearm_at: float
) -> tuple[float, float]:
    """When, with no new event, something could next change: ``(next_change,
    levels_due)``, both never later than the truth (inf: nothing to wait for).

    ``highest`` is the highest armed level (-inf: none), ``rearm_at`` the lowest
    capital at which a fired level re-arms (inf: every level is armed).

    ``levels_due`` is the earliest time a level could fire or re-arm; ``next_change``
    adds the next licence step. Firing: while capital only drains by silence the
    time is exact; with fading penalties still active it is the time the level
    would fire if those traces stopped fading now, a lower bound that ``tick``
    refines on its visit.
    """
    step = math.inf
    owed = 0.0
    steps = state.steps
    licence = rules.licence
    if licence is not None:
        owed, steps = licence_due(state, rules, t)
        if licence.up_to - state.balance - owed > 0:
            step = state.clean_since + (steps + 1) * licence.clean_for
    levels = rules.levels
    if not levels:
        return step, math.inf
    remembered = traces(state, t)
    base = state.balance + owed - remembered
    all_armed = rearm_at == math.inf
    due = math.inf
    if not all_armed and step < math.inf:
        due = _licence_rearm(state, rules, t, steps, base + remembered, rearm_at)
    silence = rules.silence
    if (highest > -math.inf and silence is not None and silence.rate_per_day > 0
            and highest > rules.capital.min):
        fire = _silence_fire(state, rules, t, highest, owed, steps, remembered)
        if fire < 1e15:  # else never, as far as floats can tell (a tiny drain)
            # the first candidate millisecond after t (transitions up to t are applied)
            fire_ms = max(math.ceil(fire * 1000.0), math.floor(t * 1000.0) + 1)
            due = min(due, fire_ms / 1000.0)
    if not all_armed and state.penalties:
        due = min(due, _earliest_rearm(state, rules, rearm_at, t, base, remembered, due))
    return min(step, due), due


#: licence steps :func:`_silence_fire` looks through (a licence of tiny steps would
#: otherwise cost a step each)
_FIRE_STEPS = 32


def _silence_fire(state: Capital, rules: RuleSet, t: float, highest: float,
                  owed: float, steps: int, remembered: float) -> float:
    """A time never later than the first at which the silence drain takes capital
    below ``highest`` (the highest armed level); inf: never.

    From ``t`` on, capital is at least ``B + Lic(x) - T(t) - S(x)``: the licence only
    gives, traces only fade. Between two licence steps the drain passes that bound
    at a time in closed form; when that is after the next step, the search goes on
    from the step with its points (through ``_FIRE_STEPS`` steps at most: past them,
    the time found so far, still never late). Exact while no trace is left to fade
    and the firing comes within those steps.

    ``owed`` and ``steps`` are the licence's at ``t``, ``remembered`` is ``T(t)``.
    """
    silence = rules.silence
    licence = rules.licence
    assert silence is not None
    room = licence.up_to - state.balance - owed if licence is not None else 0.0
    for _ in range(_FIRE_STEPS):
        margin = state.balance + owed - remembered - highest  # the drain may take this
        days = silence.after / DAY + max(margin, 0.0) / silence.rate_per_day
        fire = state.last_contact + days * DAY
        if room <= 0 or not fire < 1e15:
            return fire
        assert licence is not None
        step_at = state.clean_since + (steps + 1) * licence.clean_for
        last = math.ceil(step_at * 1000.0) - 1  # the step's millisecond, minus one
        first = math.ceil(fire * 1000.0)  # (or the millisecond before the firing)
        if first < last or (first == last and raw_capital(state, rules, last / 1000.0)
                            < highest):
            return fire  # it comes before the step
        gain = min(licence.points, room)
        owed += gain
        room -= gain
        steps += 1
    return fire  # nothing fires before it: later steps only give more


def _licence_rearm(state: Capital, rules: RuleSet, t: float, steps: int,
                   settled: float, target: float) -> float:
    """The licence step before which capital cannot reach ``target`` (inf: none can).

    ``steps`` are the licence steps counted at ``t`` and ``settled`` is B plus the
    licence they owe; traces never fall below their
    keep floors and silence only grows, which bounds capital from above.
    """
    licence = rules.licence
    assert licence is not None
    best = settled - silence_due(state, rules, t)
    for points, _, _, keep, _, _, _ in state.penalties:
        best -= points * keep
    if best >= target:
        needed = 1
    else:
        room = licence.up_to - settled
        gap = target - best
        if gap > room:
            return math.inf
        needed = math.ceil(gap / licence.points)
    return state.clean_since + (steps + needed) * licence.clean_for


def _earliest_rearm(state: Capital, rules: RuleSet, target: float, t: float,
                    base: float, remembered: float, until: float) -> float:
    """A time never later than the first re-arming before ``until`` (inf: none).

    Until the next licence step capital is at most ``B + Lic(t) - S(t) - T(x)``, so
    re-arming needs ``T(x) <= allowance``; every trace is part of T, so none of them
    can be above the allowance either, which gives a bound in closed form.
    """
    if target > rules.capital.max:
        return math.inf
    allowance = base + remembered - silence_due(state, rules, t) - target
    if allowance < 0:
        return math.inf
    when = t
    for points, t0, fade, keep, _, _, settles_at in state.penalties:
        share = allowance / points
        if share >= 1:
            continue
        if share < keep:
            return math.inf
        # a trace is forgotten at settles_at even if its fade never reaches zero
        when = max(when, min(t0 + reaches(fade, share), settles_at))
    if not when < 1e15:
        return math.inf
    when = max(math.floor(when * 1000.0), math.floor(t * 1000.0) + 1) / 1000.0
    return when if when < until else math.inf
