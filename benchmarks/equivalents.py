"""Mutants of the arithmetic that change no behaviour, and why: benchmarks/mutation.py
reports a survivor listed here as equivalent, apart from those it cannot explain.

Each entry names the module, the function, a piece of the mutated source line and
the mutation as the campaign prints it (``*``: any mutation of that line), and says
why no input can tell the mutant from the original. Three reasons come back:

- **the same value at the boundary**: ``<`` for ``<=`` where both branches give the
  same number when the two sides are equal (a clamp at its bound, a drain of 0
  days, a licence with no room);
- **unreachable**: a branch no caller can take (a share of 0 or less, a penalty
  of 0 points), because the callers or the loader rule it out;
- **speed only**: the chord of ``_crossing`` picks where to probe next; any probe
  inside the bracket gives the same answer (tests/test_crossings.py checks the
  answer and the number of probes against plain bisection).

A survivor that is none of these is a test to write, not an entry to add.
"""

from __future__ import annotations

from typing import NamedTuple


class Equivalent(NamedTuple):
    module: str
    function: str
    code: str  # a piece of the mutated source line
    what: str  # the mutation as printed ("*": any on that line)
    why: str


CAPITAL = "retention/capital.py"
_BOUNDARY = "the same value when both sides are equal"

EQUIVALENT: list[Equivalent] = [
    # share_left: called only while a trace fades (t < settles_at <= t0 + over), where
    # a linear fade still has a share above 0
    Equivalent(CAPITAL, "share_left", "return left if left > 0.0 else 0.0", "*",
               "only called before settles_at, where a linear fade's share is above 0"),
    # reaches: a share of 0 or less is never asked for (a floor is keep > 0 or
    # NEGLIGIBLE / points > 0; a re-arm allowance below 0 returns earlier and one of
    # exactly 0 cannot occur against a threshold the tie tolerance shifted)
    Equivalent(CAPITAL, "reaches", "share <= 0", "*",
               "unreachable: no caller asks for a share of 0 or less"),
    Equivalent(CAPITAL, "reaches", "return math.inf", "*",
               "unreachable: no caller asks for a share of 0 or less"),
    # fading_penalty: the engine fades only negative points (as positive ones), a
    # recovery refits only a positive rest
    Equivalent(CAPITAL, "fading_penalty", "if points <= 0:", "<= -> <",
               "unreachable: a penalty of 0 points is never made"),
    # a floor over 1 is a trace under NEGLIGIBLE points without keep: settled at
    # once whatever the cap (reaches() of a share >= 1 is 0 or before t0)
    Equivalent(CAPITAL, "fading_penalty", "min(floor, 1.0)", "*",
               "a floor over 1 settles the trace at once either way"),
    # at settles_at itself the fade gives its floor: the keep floor, or NEGLIGIBLE
    # points (forgotten: 0), a difference of at most 1e-6 points for one instant,
    # the resolution NEGLIGIBLE defines
    Equivalent(CAPITAL, "remaining", "if t >= settles_at:", ">= -> >",
               "at settles_at the fade gives its floor (within NEGLIGIBLE points)"),
    Equivalent(CAPITAL, "raw_capital", "if t >= settles_at:", ">= -> >",
               "at settles_at the fade gives its floor (within NEGLIGIBLE points)"),
    # before settles_at the share is above keep by construction
    Equivalent(CAPITAL, "remaining", "share if share > keep else keep", "*",
               "before settles_at the share is above keep"),
    Equivalent(CAPITAL, "raw_capital", "share if share > keep else keep", "*",
               "before settles_at the share is above keep"),
    Equivalent(CAPITAL, "clamp", "low if value < low else high if value > high", "< -> <=",
               _BOUNDARY),
    Equivalent(CAPITAL, "clamp", "low if value < low else high if value > high", "> -> >=",
               _BOUNDARY),
    # step counts: (t - clean_since) // clean_for is already whole and t >= clean_since
    Equivalent(CAPITAL, "licence_due", "int((t - state.clean_since) // licence.clean_for)",
               "int -> round", "a floor division gives a whole number already"),
    Equivalent(CAPITAL, "licence_due", "int((t - state.clean_since) // licence.clean_for)",
               "// -> /", "int() of a quotient of non-negative numbers is its floor"),
    Equivalent(CAPITAL, "raw_capital", "int((t - state.clean_since) // licence.clean_for)",
               "int -> round", "a floor division gives a whole number already"),
    Equivalent(CAPITAL, "raw_capital", "int((t - state.clean_since) // licence.clean_for)",
               "// -> /", "int() of a quotient of non-negative numbers is its floor"),
    Equivalent(CAPITAL, "licence_due", "return 0.0, state.steps", "*",
               "steps never fall: with no new step the rest returns (0, steps) too"),
    Equivalent(CAPITAL, "licence_due", "if steps <= state.steps:", "<= -> <",
               "no new step owes 0 points either way"),
    Equivalent(CAPITAL, "licence_due", "if room <= 0:", "<= -> <", _BOUNDARY),
    Equivalent(CAPITAL, "licence_due", "owed if owed < room else room", "< -> <=", _BOUNDARY),
    Equivalent(CAPITAL, "raw_capital", "if steps > state.steps:", "> -> >=", _BOUNDARY),
    Equivalent(CAPITAL, "raw_capital", "if room > 0:", "> -> >=", _BOUNDARY),
    Equivalent(CAPITAL, "raw_capital", "owed if owed < room else room", "< -> <=", _BOUNDARY),
    Equivalent(CAPITAL, "raw_capital", "if idle > 0:", "> -> >=", _BOUNDARY),
    Equivalent(CAPITAL, "silence_due", "silence.rate_per_day <= 0", "<= -> <",
               "a rate of 0 drains 0 either way"),
    Equivalent(CAPITAL, "silence_due", "if idle > 0 else 0.0", "> -> >=", _BOUNDARY),
    # settle: the licence owes at most up_to - B, and the loader keeps up_to within
    # [min, max], so B + owed is within the bounds already
    Equivalent(CAPITAL, "settle", "clamp(old + owed, low, high)", "*",
               "B + owed <= up_to <= max: the clamp cannot bite"),
    Equivalent(CAPITAL, "settle", "if keep > 0:", "> -> >=",
               "a keep of 0 pays 0 points in either way"),
    # _licence_steps gives the cuts of level_transitions' pieces: one cut too many
    # (room overestimated, a step past the end) splits a piece where capital does not
    # jump, and both halves are concave; only a missing cut changes an answer (killed
    # by the case of a step of under a point)
    Equivalent(CAPITAL, "_licence_steps", "room = licence.up_to - state.balance - owed",
               "- -> +", "more room only adds cuts, which change no answer"),
    Equivalent(CAPITAL, "_licence_steps", "while room > 0:", "> -> >=",
               "more room only adds cuts, which change no answer"),
    Equivalent(CAPITAL, "_licence_steps", "break", "*",
               "steps past the end are cut off by the caller"),
    Equivalent(CAPITAL, "_licence_steps", "room -= licence.points", "*",
               "more room only adds cuts, which change no answer"),
    # _crossing compares with a threshold the tie tolerance already shifted: capital
    # exactly on the shifted threshold is a float coincidence (the 1-millisecond tie
    # the reference comparison accepts, docs/concepts.md, "Ties at thresholds")
    Equivalent(CAPITAL, "_crossing", "return v < level if falling else v >= level",
               "< -> <=", "differs only exactly on the tie-shifted threshold"),
    Equivalent(CAPITAL, "_crossing", "return v < level if falling else v >= level",
               ">= -> >", "differs only exactly on the tie-shifted threshold"),
    # the chord of _crossing: where to probe next; any probe in the bracket keeps the
    # answer (a probe outside it, on the safe side, is still a point not crossed)
    Equivalent(CAPITAL, "_crossing", "if use_chord and v_lo != v_hi:", "!= -> ==",
               "speed only: plain bisection instead of the chord"),
    Equivalent(CAPITAL, "_crossing", "m = min(max(math.floor(guess), lo + 1), hi - 1)", "*",
               "speed only: another probe, the same answer"),
    Equivalent(CAPITAL, "_crossing", "if m + 1 < hi:", "*",
               "speed only: the neighbour probed or not, the same answer"),
    Equivalent(CAPITAL, "_crossing", "use_chord = (hi - lo) * 2 <= width", "*",
               "speed only: when to fall back to bisection"),
]


def explain(module: str, function: str, code: str, what: str) -> str | None:
    """Why a surviving mutant is equivalent, or None when nothing here says so."""
    for entry in EQUIVALENT:
        if (entry.module == module and entry.function == function and entry.code in code
                and entry.what in ("*", what)):
            return entry.why
    return None
