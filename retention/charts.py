"""Charts of tolerance capital: what to draw is computed from the engine, then drawn
with matplotlib (the ``plot`` extra: ``pip install 'retention-engine[plot]'``).

Two steps, so that tests can check each (docs/hosts.md, "Charts"):

- :func:`trajectory` and :func:`distribution` read the engine (any ``Engine``, the
  stored one included) and return plain values: the capital line sampled at the
  moments where it may bend or jump, the ledger entries and decisions placed on it,
  the levels; or every open customer's capital at a moment, by level.
- :func:`draw_trajectory` and :func:`draw_distribution` turn those values into a
  matplotlib ``Figure`` (no pyplot: no global state, no display, safe in a server);
  :func:`render` gives its PNG or SVG bytes.

matplotlib draws PNG and SVG headless with no browser and no service, and Debian
and PyPI both carry it; the Datasette plugin serves the very same figures.
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import attrs

from .capital import capital_at
from .errors import RetentionError
from .times import from_seconds, parse_instant

#: The ledger categories marked on a trajectory, by the force they are (DESIGN.md
#: section 4): time's own entries (silence, fading, licence) show as the line itself.
FORCES = {
    "incident": "incidents",
    "pull": "pull-away forces",
    "satisfaction": "retention forces",
    "recovery": "retention forces",
    "contribution": "retention forces",
}
#: One colour per force (matplotlib's tab10: red, orange, green), and for the line.
COLOURS = {
    "incidents": "#d62728",
    "pull-away forces": "#ff7f0e",
    "retention forces": "#2ca02c",
}
LINE_COLOUR = "#1f77b4"
#: The distribution's colours: customers in no level, then each level, highest first.
LEVEL_COLOURS = ("#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#7f7f7f")
#: One marker shape per decision status.
STATUS_MARKERS = {
    "pending": "o", "sending": ">", "sent": "^", "failed": "X", "suppressed": "s",
    "held_out": "D", "expired": "v",
}
#: Evenly spaced samples of the line, on top of the moments where it bends or jumps.
SAMPLES = 240
#: Licence steps drawn per stretch between two events at most.
MAX_STEPS = 200
#: Decisions labelled with their action and status at most (more would be a blur).
MAX_LABELS = 12

FORMATS = ("png", "svg")


def require() -> Any:
    """matplotlib's Figure class; a RetentionError naming the extra when it is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RetentionError("charts need matplotlib: pip install 'retention-engine[plot]'"
                             ) from None
    return Figure


@attrs.frozen(kw_only=True)
class Mark:
    """A ledger entry on the capital line: at its time, at the capital it left."""

    at: datetime
    capital: float
    force: str
    category: str
    rule: str
    points: float
    reason: str


@attrs.frozen(kw_only=True)
class DecisionMark:
    """A decision on the capital line, with its status."""

    at: datetime
    capital: float
    action: str
    rule: str
    status: str


@attrs.frozen(kw_only=True)
class Trajectory:
    """One customer's capital from the opening to ``at``: ``capitals[i]`` is the
    engine's capital at ``times[i]``."""

    customer: str
    at: datetime
    times: tuple[datetime, ...]
    capitals: tuple[float, ...]
    marks: tuple[Mark, ...]
    decisions: tuple[DecisionMark, ...]
    levels: tuple[tuple[str, float], ...]
    low: float
    high: float


@attrs.frozen(kw_only=True)
class Distribution:
    """Every customer open at ``at``, their capital then, grouped by level (``none``:
    in no level), the levels highest threshold first."""

    at: datetime
    by_level: tuple[tuple[str, tuple[float, ...]], ...]
    levels: tuple[tuple[str, float], ...]
    low: float
    high: float

    @property
    def customers(self) -> int:
        return sum(len(capitals) for _, capitals in self.by_level)


def _moment(at: str | datetime) -> datetime:
    return at if isinstance(at, datetime) else parse_instant(at)


def _canonical(engine: Any, customer: str) -> str:
    resolve = getattr(engine, "resolve", None)
    return resolve(customer) if resolve else customer


def trajectory(engine: Any, customer: str, at: str | datetime, *,
               samples: int = SAMPLES) -> Trajectory:
    """The capital of ``customer`` from their opening to ``at``, sampled where it bends
    or jumps (each event and a millisecond before it, the end of the silence grace,
    each licence step, each trace fading out, each decision) and at ``samples``
    evenly spaced moments for the curves of fading traces. Every value is
    ``engine.capital(customer, time)``, computed in one replay of their events
    (``engine.states``): between two events the capital is the arithmetic of the
    state the first one left."""
    end = _moment(at)
    cid = _canonical(engine, customer)
    rules = engine.rules
    end_ms = _ms(end.timestamp())
    events = sorted({_ms(t) for t in engine.event_times(cid) if _ms(t) <= end_ms})
    if not events:
        if engine.as_of(cid, end) is None:
            raise RetentionError(f"unknown customer {customer!r}")
        raise _not_open(cid, end)
    made = [d for d in engine.decisions(cid) if d.at <= end]
    decided = sorted({_ms(d.at.timestamp()) for d in made})
    values: dict[int, float] = {}  # (moments in milliseconds, the engine's grid)
    grid: list[int] = []
    for k, (t, state) in enumerate(engine.states(cid, end)):
        if state.opened_at is None or state.opened_at > t:
            continue  # a prospect's events move no capital
        start = events[k]
        if not grid:
            step = (end_ms - start) / max(1, samples)
            grid = sorted({start + round(i * step) for i in range(samples)} | {end_ms})
        until = events[k + 1] if k + 1 < len(events) else end_ms + 1
        moments = {start, until - 1, *_between(grid, start, until),
                   *_between(decided, start, until),
                   *(m for m in _bends(state, rules, start, until) if start < m < until)}
        for m in moments:
            values[m] = capital_at(state, rules, m / 1000)
    if not values:
        raise _not_open(cid, end)

    def capital(moment: datetime) -> float:
        key = _ms(moment.timestamp())
        return values[key] if key in values else engine.capital(cid, moment)

    marks = tuple(
        Mark(at=e.at, capital=capital(e.at), force=FORCES[e.category],
             category=e.category, rule=e.rule, points=e.points, reason=e.reason)
        for e in engine.explain(cid, at=end) if e.settled and e.category in FORCES)
    decisions = tuple(
        DecisionMark(at=d.at, capital=capital(d.at), action=d.action, rule=d.rule,
                     status=d.status) for d in made)
    times = sorted(values)
    return Trajectory(
        customer=cid, at=end, times=tuple(from_seconds(m / 1000) for m in times),
        capitals=tuple(values[m] for m in times), marks=marks, decisions=decisions,
        levels=tuple((lv.name, lv.below) for lv in rules.levels),
        low=rules.capital.min, high=rules.capital.max)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _not_open(cid: str, end: datetime) -> RetentionError:
    return RetentionError(f"{cid} is not a customer yet at {end.isoformat()} "
                          "(a prospect: no capital to draw)")


def _between(ordered: list[int], start: int, until: int) -> list[int]:
    """The values of ``ordered`` in ``[start, until)``."""
    return ordered[bisect.bisect_left(ordered, start):bisect.bisect_left(ordered, until)]


def _bends(state: Any, rules: Any, start: int, until: int) -> Iterable[int]:
    """Where the capital of ``state`` (as an event at ``start`` left it) bends or jumps
    before the next event at ``until`` (milliseconds): the silence drain starting,
    each licence step (and a millisecond before it), each trace fading out."""
    silence = rules.silence
    if silence is not None and silence.rate_per_day > 0:
        yield _ms(state.last_contact + silence.after)
    licence = rules.licence
    if licence is not None:
        for n in range(state.steps + 1, state.steps + 1 + MAX_STEPS):
            step = _ms(state.clean_since + n * licence.clean_for)
            if step >= until:
                break
            yield step
            yield step - 1
    for penalty in state.penalties:
        if math.isfinite(penalty[6]):  # (settles_at)
            yield _ms(penalty[6])


def distribution(engine: Any, at: str | datetime) -> Distribution:
    """Every customer open at ``at`` with their capital then, by level, as
    ``engine.capitals(at)`` gives them (the numbers of ``retention at-risk --at``)."""
    rules = engine.rules
    groups: dict[str, list[float]] = {lv.name: [] for lv in rules.levels}
    groups["none"] = []
    for _, level, capital in engine.capitals(at):
        groups[level or "none"].append(capital)
    order = ["none", *(lv.name for lv in sorted(rules.levels, key=lambda lv: -lv.below))]
    return Distribution(
        at=_moment(at), by_level=tuple((name, tuple(groups[name])) for name in order),
        levels=tuple((lv.name, lv.below) for lv in rules.levels),
        low=rules.capital.min, high=rules.capital.max)


# -- drawing --------------------------------------------------------------------------

def draw_trajectory(data: Trajectory, *, width: float = 10.0, height: float = 5.0) -> Any:
    """The capital line, the ledger entries by force, the decisions by status and the
    levels, as a matplotlib Figure."""
    Figure = require()
    from matplotlib import dates

    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(list(data.times), list(data.capitals), color=LINE_COLOUR, linewidth=1.6,
            label="capital", gid="capital")
    for force, colour in COLOURS.items():
        marks = [m for m in data.marks if m.force == force]
        if marks:
            ax.scatter([m.at for m in marks], [m.capital for m in marks], color=colour,
                       s=36, zorder=3, label=force, gid=force)
    for status, shape in STATUS_MARKERS.items():
        made = [d for d in data.decisions if d.status == status]
        if made:
            ax.scatter([d.at for d in made], [d.capital for d in made], marker=shape,
                       s=70, facecolors="none", edgecolors="black", linewidths=1.2,
                       zorder=4, label=f"decision {status}", gid=f"decision {status}")
    together: dict[tuple[datetime, float], list[DecisionMark]] = {}
    for d in data.decisions:  # (one label for the decisions of one moment)
        together.setdefault((d.at, d.capital), []).append(d)
    if len(together) <= MAX_LABELS:
        for (at, capital), made in together.items():
            ax.annotate(", ".join(f"{d.action} ({d.status})" for d in made), (at, capital),
                        xytext=(6, -12), textcoords="offset points", fontsize=7)
    for name, below in data.levels:
        ax.axhline(below, color="grey", linestyle="--", linewidth=0.9, gid=f"level {name}")
        ax.text(1.005, below, name, transform=ax.get_yaxis_transform(), va="center",
                fontsize=8, color="dimgrey")
    span = data.high - data.low
    ax.set_ylim(data.low - 0.03 * span, data.high + 0.03 * span)
    locator = dates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
    ax.set_ylabel("tolerance capital")
    ax.set_title(f"{data.customer}: capital up to {data.at.isoformat()}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=8, frameon=False)
    return fig


def draw_distribution(data: Distribution, *, width: float = 9.0, height: float = 4.5,
                      bins: int = 20) -> Any:
    """A histogram of the capitals, stacked by level, the levels' thresholds marked."""
    Figure = require()

    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    edges = [data.low + i * (data.high - data.low) / bins for i in range(bins + 1)]
    groups = [(name, list(capitals)) for name, capitals in data.by_level]
    ax.hist([c for _, c in groups], bins=edges, stacked=True,
            color=[LEVEL_COLOURS[min(i, len(LEVEL_COLOURS) - 1)] for i in range(len(groups))],
            label=[f"{name} ({len(c)})" for name, c in groups])
    for name, below in data.levels:
        ax.axvline(below, color="grey", linestyle="--", linewidth=0.9, gid=f"level {name}")
        ax.text(below, 1.0, f" {name} < {below:g}", transform=ax.get_xaxis_transform(),
                va="top", fontsize=8, color="dimgrey")
    ax.set_xlim(data.low, data.high)
    ax.set_xlabel("tolerance capital")
    ax.set_ylabel("customers")
    ax.set_title(f"{data.customers} customers at {data.at.isoformat()}, by level",
                 fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return fig


def render(fig: Any, fmt: str) -> bytes:
    """The figure as PNG or SVG bytes."""
    if fmt not in FORMATS:
        raise RetentionError(f"charts are drawn as {' or '.join(FORMATS)}, not {fmt!r}")
    from matplotlib import rc_context

    buffer = io.BytesIO()
    # no creation date, ids from a fixed salt: the same data gives the same bytes
    with rc_context({"svg.hashsalt": "retention"}):
        fig.savefig(buffer, format=fmt, dpi=100,
                    metadata={"Date": None} if fmt == "svg" else {})
    return buffer.getvalue()


def as_dict(data: Trajectory | Distribution) -> dict[str, Any]:
    """The data of a chart as JSON-ready values (``retention plot --json``)."""
    return attrs.asdict(data, value_serializer=_plain)


def _plain(_: Any, __: Any, value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def format_of(path: str) -> str:
    """png or svg, from a file name; a RetentionError for any other."""
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if suffix not in FORMATS:
        raise RetentionError(f"{path}: give a file name ending in .png or .svg")
    return suffix
