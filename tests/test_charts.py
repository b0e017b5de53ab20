"""Charts: what retention plot draws is the engine's capital, its ledger and decisions
(retention/charts.py, docs/hosts.md "Charts")."""

import json
import struct
import subprocess
import sys
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib import colors, dates

from retention import charts, load_texts
from retention.cli import cli
from retention.engine import Engine
from retention.errors import RetentionError
from retention.store import StoredEngine, StoreError
from retention.times import DAY, parse_instant

RULES = """\
capital: {initial: 70, min: 0, max: 100, opens_on: [purchase]}
rules:
  late_delivery: {when: event.type == "delivery" and event.delay_days > 2, points: -10,
                  fades_over: 30d, category: incident}
  complaint: {when: event.type == "complaint", points: -12, category: incident}
  complaint_resolved: {when: event.type == "ticket_resolved", recovers: complaint,
                       match: ticket_id, within: 7d, bonus: 3, category: recovery}
  satisfied_purchase: {when: event.type == "purchase", points: 2, category: satisfaction}
  competitor_visit: {when: event.type == "price_compare", points: -5, fades_over: 14d,
                     category: pull}
silence: {after: 30d, rate_per_day: 0.5}
licence: {clean_for: 60d, points: 5}
levels:
  - {name: watch, below: 55, then: [flag_in_crm]}
  - {name: rupture, below: 35, then: [call_customer]}
actions:
  flag_in_crm: {kind: service, via: crm_tag}
  call_customer: {kind: service, via: crm_task}
"""

EVENTS = [
    {"id": "1", "customer": "alice", "type": "purchase", "at": "2025-01-01T10:00:00+00:00"},
    {"id": "2", "customer": "alice", "type": "purchase", "at": "2025-01-10T10:00:00+00:00"},
    {"id": "3", "customer": "alice", "type": "price_compare", "at": "2025-01-20T10:00:00+00:00"},
    {"id": "4", "customer": "alice", "type": "complaint", "ticket_id": "t1",
     "at": "2025-02-01T10:00:00+00:00"},
    {"id": "5", "customer": "alice", "type": "ticket_resolved", "ticket_id": "t1",
     "at": "2025-02-03T10:00:00+00:00"},
    {"id": "6", "customer": "alice", "type": "delivery", "delay_days": 5,
     "at": "2025-02-05T10:00:00+00:00"},
    {"id": "7", "customer": "alice", "type": "complaint", "ticket_id": "t2",
     "at": "2025-02-06T10:00:00+00:00"},
    {"id": "8", "customer": "bob", "type": "purchase", "at": "2025-03-01T10:00:00+00:00"},
    {"id": "9", "customer": "bob", "type": "price_compare", "at": "2025-03-02T10:00:00+00:00"},
    {"id": "10", "customer": "carol", "type": "price_compare",
     "at": "2025-03-01T10:00:00+00:00"},
    {"id": "11", "customer": "dan", "type": "purchase", "at": "2025-09-01T10:00:00+00:00"},
]
END = "2025-10-01T00:00:00+00:00"
#: the last contact (event 7) and the silence grace (30 days) after it
GRACE_END = parse_instant("2025-02-06T10:00:00+00:00") + timedelta(days=30)
#: alice's clean period starts at her last incident (event 7); the licence steps 60 days on
LICENCE_STEP = parse_instant("2025-02-06T10:00:00+00:00") + timedelta(days=60)


@pytest.fixture
def store(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    path = tmp_path / "retention.db"
    with StoredEngine(path, rules) as engine:
        engine.ingest([dict(e, source="test") for e in EVENTS])
        engine.tick(END)
    with StoredEngine(path, read_only=True) as engine:
        yield engine


def close(a, b):
    return abs(a - b) < 1e-9


def test_the_line_is_the_engines_capital_at_each_time_drawn(store):
    data = charts.trajectory(store, "alice", END)
    assert data.times[0] == parse_instant(EVENTS[0]["at"])  # from the opening
    assert data.times[-1] == parse_instant(END)
    assert len(data.times) == len(set(data.times)) > charts.SAMPLES
    for t, capital in zip(data.times, data.capitals, strict=True):
        assert close(capital, store.capital("alice", t)), t
    (line,) = charts.draw_trajectory(data).axes[0].get_lines()[:1]
    drawn_x, drawn_y = line.get_xdata(), line.get_ydata()
    assert len(drawn_x) == len(data.times)
    for x, y, t in zip(drawn_x, drawn_y, data.times, strict=True):
        moment = dates.num2date(dates.date2num(x))
        assert abs((moment - t).total_seconds()) < 1e-3
        assert close(y, store.capital("alice", moment))


def test_each_event_is_a_jump_drawn_from_just_before_it(store):
    data = charts.trajectory(store, "alice", END)
    at = dict(zip(data.times, data.capitals, strict=True))
    complaint = parse_instant(EVENTS[6]["at"])
    before = complaint - timedelta(milliseconds=1)
    assert before in at and complaint in at
    # the complaint's points, and the late delivery's trace fading for a millisecond
    assert at[before] - at[complaint] == pytest.approx(12, abs=1e-6)


def test_the_silence_drain_is_drawn_as_the_slope_it_is(store):
    data = charts.trajectory(store, "alice", END)
    points = list(zip(data.times, data.capitals, strict=True))
    assert GRACE_END in data.times  # where the line bends
    grace = data.times.index(GRACE_END)
    # flat (but for the fading traces) before, then half a point a day until the step
    drain = [(t, c) for t, c in points
             if GRACE_END <= t < LICENCE_STEP - timedelta(milliseconds=1)]
    assert len(drain) > 10
    start_t, start_c = points[grace]
    for t, c in drain:
        # the late delivery's trace (a straight fade over 30 days) is gone by then
        assert close(c, start_c - 0.5 * (t - start_t).total_seconds() / DAY), t


def test_a_licence_step_is_drawn_as_its_jump(store):
    data = charts.trajectory(store, "alice", END)
    at = dict(zip(data.times, data.capitals, strict=True))
    before = LICENCE_STEP - timedelta(milliseconds=1)
    assert LICENCE_STEP in at and before in at
    assert close(at[LICENCE_STEP] - at[before], 5 - 0.5 / DAY * 0.001)


def test_ledger_entries_are_marked_in_their_forces_colours(store):
    data = charts.trajectory(store, "alice", END)
    forces = Counter((m.rule, m.force) for m in data.marks)
    assert forces == Counter({
        ("satisfied_purchase", "retention forces"): 2,
        ("competitor_visit", "pull-away forces"): 1,
        ("complaint", "incidents"): 2,
        ("complaint_resolved", "retention forces"): 2,  # the refund, the bonus
        ("late_delivery", "incidents"): 1,
    })
    for m in data.marks:
        assert close(m.capital, store.capital("alice", m.at))
    ax = charts.draw_trajectory(data).axes[0]
    drawn = {c.get_gid(): c for c in ax.collections}
    for force, colour in charts.COLOURS.items():
        collection = drawn[force]
        assert tuple(collection.get_facecolors()[0]) == colors.to_rgba(colour)
        offsets = [tuple(o) for o in collection.get_offsets()]
        expected = [(dates.date2num(m.at), m.capital) for m in data.marks if m.force == force]
        assert np.allclose(offsets, expected)
    assert len({tuple(drawn[f].get_facecolors()[0]) for f in charts.COLOURS}) == 3


def test_decisions_are_marked_with_their_status_and_levels_drawn_with_names(store):
    data = charts.trajectory(store, "alice", END)
    made = store.decisions("alice")
    assert [(d.action, d.status, d.at) for d in data.decisions] == \
        [(d.action, d.status, d.at) for d in made]
    assert {d.action for d in made} == {"flag_in_crm", "call_customer"}
    for d in data.decisions:  # time-driven crossings: on the line, at the level
        assert d.at in data.times
        assert close(d.capital, store.capital("alice", d.at))
    watch = next(d for d in data.decisions if d.action == "flag_in_crm")
    assert 54.99 < watch.capital < 55
    fig = charts.draw_trajectory(data)
    ax = fig.axes[0]
    pending = next(c for c in ax.collections if c.get_gid() == "decision pending")
    assert len(pending.get_offsets()) == 2
    levels = {line.get_gid(): line.get_ydata()[0] for line in ax.get_lines()[1:]}
    assert levels == {"level watch": 55, "level rupture": 35}
    texts = {t.get_text() for t in ax.texts}
    assert {"watch", "rupture", "flag_in_crm (pending)", "call_customer (pending)"} <= texts


def test_the_distribution_holds_every_open_customer_at_the_moment(store):
    data = charts.distribution(store, END)
    by_level = dict(data.by_level)
    assert data.customers == 3  # carol is a prospect
    everyone = {cid: store.capital(cid, END) for cid in ("alice", "bob", "dan")}
    assert sorted(c for caps in by_level.values() for c in caps) == \
        pytest.approx(sorted(everyone.values()))
    risky = store.at_risk(now=END)
    assert sorted(c for name in ("watch", "rupture") for c in by_level[name]) == \
        pytest.approx(sorted(r["capital"] for r in risky))
    assert [r["customer"] for r in risky] == ["alice", "bob"]
    # both drained to the floor; dan bought a month ago
    assert by_level["rupture"] == (0, 0) and by_level["none"] == (everyone["dan"],)
    ax = charts.draw_distribution(data).axes[0]
    edges = np.linspace(0, 100, 21)
    below = np.zeros(20)
    for (name, capitals), bars in zip(data.by_level, ax.containers, strict=True):
        heights = np.array([b.get_height() for b in bars])
        counts, _ = np.histogram(capitals, bins=edges)
        assert np.allclose(heights, counts), name  # each level's own bars, stacked
        assert np.allclose([b.get_y() for b in bars], below)
        below += counts
    assert below.sum() == 3


def test_an_in_memory_engine_draws_the_same(store):
    engine = Engine(store.rules)
    engine.process_many([dict(e, source="test") for e in EVENTS])
    engine.tick(END)
    ours, theirs = charts.trajectory(engine, "alice", END), charts.trajectory(store, "alice", END)
    assert ours.times == theirs.times
    assert np.allclose(ours.capitals, theirs.capitals)
    assert sorted(charts.distribution(engine, END).by_level) == \
        sorted(charts.distribution(store, END).by_level)


KINDS = ["purchase", "price_compare", "complaint", "ticket_resolved", "delivery", "review"]


@settings(max_examples=40)
@given(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 400 * 24 * 60),
                          st.sampled_from(["t1", "t2"]), st.integers(0, 9)),
                min_size=1, max_size=40),
       st.integers(0, 500 * 24 * 60))
def test_any_story_is_drawn_at_the_engines_capital(story, end_minutes):
    """The one replay the chart reads equals the engine's capital at every moment drawn,
    whatever the events (in minutes from 2025-01-01) and the moment drawn up to."""
    engine = Engine(load_texts([("rules.yaml", RULES)]))
    start = parse_instant("2025-01-01T00:00:00+00:00")
    engine.process_many([
        {"id": str(i), "customer": "x", "type": kind, "ticket_id": ticket, "delay_days": delay,
         "at": (start + timedelta(minutes=minute)).isoformat(), "source": "test"}
        for i, (kind, minute, ticket, delay) in enumerate(story)])
    end = start + timedelta(minutes=end_minutes)
    try:
        data = charts.trajectory(engine, "x", end)
    except RetentionError as exc:
        assert "prospect" in str(exc)
        assert engine.capital("x", end) is None
        return
    for t, capital in zip(data.times, data.capitals, strict=True):
        assert close(capital, engine.capital("x", t)), t
    for m in (*data.marks, *data.decisions):
        assert close(m.capital, engine.capital("x", m.at))


def test_a_prospect_or_unknown_customer_has_no_chart(store):
    with pytest.raises(RetentionError, match="prospect"):
        charts.trajectory(store, "carol", END)
    with pytest.raises(RetentionError, match="unknown customer"):
        charts.trajectory(store, "nobody", END)


def png_size(blob):
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", blob[16:24])


def test_png_and_svg_hold_the_chart(store):
    fig = charts.draw_trajectory(charts.trajectory(store, "alice", END))
    assert png_size(charts.render(fig, "png")) == (1000, 500)
    svg = charts.render(fig, "svg").decode()
    assert '<g id="capital">' in svg and "<path" in svg
    assert '<g id="incidents">' in svg and '<g id="level rupture">' in svg
    def fresh():
        return charts.render(charts.draw_trajectory(charts.trajectory(store, "alice", END)),
                             "svg")
    assert fresh() == fresh()  # no date, no random id inside
    with pytest.raises(RetentionError, match="png or svg"):
        charts.render(fig, "pdf")


def test_the_store_opened_read_only_refuses_writes(store, tmp_path):
    import sqlite3

    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.db.execute("DELETE FROM events")
    with pytest.raises(StoreError, match="no such database"):
        StoredEngine(tmp_path / "none.db", read_only=True)
    with pytest.raises(StoreError, match="opened read-only, it cannot take new rules"):
        StoredEngine(store.path, store.rules, read_only=True)
    older = tmp_path / "older.db"
    with sqlite3.connect(store.path) as source, sqlite3.connect(older) as copy:
        source.backup(copy)
        copy.execute("PRAGMA user_version = 5")
    with pytest.raises(StoreError, match="an older schema"):
        StoredEngine(older, read_only=True)
    with sqlite3.connect(older) as copy:  # (and so it was left as it was)
        assert copy.execute("PRAGMA user_version").fetchone() == (5,)


# -- the command ----------------------------------------------------------------------

@pytest.fixture
def db(store):
    return str(store.path)


def test_plot_writes_the_customers_chart(db, tmp_path, store):
    out = tmp_path / "alice.png"
    result = CliRunner().invoke(cli, ["plot", "--db", db, "alice", "--at", END, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert png_size(out.read_bytes()) == (1000, 500)
    shown = CliRunner().invoke(cli, ["plot", "--db", db, "alice", "--at", END, "--json"])
    data = json.loads(shown.output)
    assert data["customer"] == "alice" and data["at"] == parse_instant(END).isoformat()
    for t, capital in zip(data["times"], data["capitals"], strict=True):
        assert close(capital, store.capital("alice", t))
    assert {m["force"] for m in data["marks"]} == set(charts.COLOURS)


def test_plot_distribution_writes_svg_and_its_data(db, tmp_path, store):
    out = tmp_path / "d.svg"
    result = CliRunner().invoke(cli, ["plot", "--db", db, "--distribution", "--at", END,
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().lstrip().startswith("<?xml")
    data = json.loads(CliRunner().invoke(cli, ["plot", "--db", db, "--distribution", "--at",
                                               END, "--json"]).output)
    risky = CliRunner().invoke(cli, ["at-risk", "--db", db, "--at", END, "--json"])
    assert sorted(data["by_level"][1][1] + data["by_level"][2][1]) == \
        sorted(r["capital"] for r in json.loads(risky.output))


@pytest.mark.parametrize("args, message", [
    ([], "give a CUSTOMER or --distribution"),
    (["alice", "--distribution"], "give a CUSTOMER or --distribution"),
    (["alice", "-o", "x.pdf"], "x.pdf: give a file name ending in .png or .svg"),
    (["nobody"], "error: unknown customer 'nobody'"),
])
def test_plot_mistakes_are_one_line(db, args, message):
    result = CliRunner().invoke(cli, ["plot", "--db", db, "--at", END, *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_plot_without_matplotlib_says_which_extra(db, tmp_path):
    # matplotlib made unimportable in a fresh interpreter, as where it is not installed
    code = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] "
            "= None; from retention.cli import cli; cli()")
    run = subprocess.run([sys.executable, "-c", code, "plot", "--db", db, "alice", "-o",
                          str(tmp_path / "x.png")], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr == "error: charts need matplotlib: pip install " \
                         "'retention-engine[plot]'\n"
    assert not (tmp_path / "x.png").exists()
