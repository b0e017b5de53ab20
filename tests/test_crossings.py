"""The millisecond searches of retention.capital against plain bisection.

``_crossing`` finds where capital crosses a level on a piece of time where it is
monotone and concave (regula falsi with bisection steps), ``_first_at_least`` where
it first reaches a level on a concave piece. Both must give exactly the first
millisecond plain bisection gives, and ``_crossing`` must never probe more than
plain bisection would (its docstring's promise: the chord is a speed trick only).
The functions are the shapes capital takes between two jumps: a trace fading
(``P * 2**(-x/H)``) against a linear silence drain, kept clear of slopes so flat
that float rounding makes them wobble (no search can be exact there).
"""

from __future__ import annotations

import math

from hypothesis import assume, given
from hypothesis import strategies as st

from retention.capital import NEGLIGIBLE, _crossing, _first_at_least

from .reference import first


class Counted:
    """A function of the millisecond, counting its calls."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, m: int) -> float:
        self.calls += 1
        return self.f(m)


def bisection_probes(width: int) -> int:
    """What plain bisection on (lo, hi] probes: both ends, then one per halving."""
    return 2 + math.ceil(math.log2(width))


widths = st.integers(2, 10**10)
points = st.floats(0.5, 200)
half_lives = st.floats(1e3, 1e10)


@given(lo=st.integers(0, 10**12), width=widths, points=points, half_life=half_lives,
       steeper=st.floats(1.1, 50.0), where=st.floats(0.001, 0.999))
def test_a_falling_crossing_is_the_first_millisecond_below(lo, width, points, half_life,
                                                           steeper, where):
    hi = lo + width
    # falling all along: the drain at least as steep as the trace's fading at lo
    drain = points * math.log(2) / half_life * steeper

    def capital(m: int) -> float:
        x = m - lo
        return 100.0 - drain * x - points * 2.0 ** (-x / half_life)

    level = capital(hi) + where * (capital(lo) - capital(hi))
    assume(capital(lo) - capital(hi) > 1e-6 and capital(hi) < level <= capital(lo))
    value = Counted(capital)
    got = _crossing(value, level, lo, hi, falling=True)
    assert got == first(lambda m: capital(m) < level, lo + 1, hi)
    assert value.calls <= 2 * bisection_probes(width)


@given(lo=st.integers(0, 10**12), width=widths, points=points, half_life=half_lives,
       drain_share=st.floats(0.0, 0.9), where=st.floats(0.001, 0.999))
def test_a_rising_crossing_is_the_first_millisecond_at_or_above(lo, width, points, half_life,
                                                                drain_share, where):
    hi = lo + width
    # rising all along: the drain never steeper than the trace's fading at hi
    drain = drain_share * points * math.log(2) / half_life * 2.0 ** (-width / half_life)

    def capital(m: int) -> float:
        x = m - lo
        return 100.0 - drain * x - points * 2.0 ** (-x / half_life)

    level = capital(lo) + where * (capital(hi) - capital(lo))
    assume(capital(hi) - capital(lo) > 1e-6 and capital(lo) < level <= capital(hi))
    value = Counted(capital)
    got = _crossing(value, level, lo, hi, falling=False)
    assert got == first(lambda m: capital(m) >= level, lo + 1, hi)
    assert value.calls <= 2 * bisection_probes(width)


@given(lo=st.integers(0, 10**9), width=st.integers(1, 5000), points=points,
       half_life=st.floats(10.0, 1e4), drain=st.floats(0.0, 1e-3),
       target=st.floats(95.0, 100.5))
def test_the_first_moment_a_concave_capital_reaches_a_level(lo, width, points, half_life,
                                                            drain, target):
    hi = lo + width

    def capital(m: int) -> float:  # rises while the trace fades faster than the drain
        x = m - lo
        return 100.0 - drain * x - points * 2.0 ** (-x / half_life)

    # (short pieces, searched one millisecond after the other)
    truth = next((m for m in range(lo, hi + 1) if capital(m) >= target), None)
    # a trace is forgotten once it holds under NEGLIGIBLE points (a jump, the end of
    # a piece): no piece reaches the float plateau where 100 - 1e-15 is 100
    assume(truth is None or points * 2.0 ** (-(truth - lo) / half_life) > NEGLIGIBLE)
    assert _first_at_least(capital, target, lo, hi) == truth
