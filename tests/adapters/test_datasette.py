"""The Datasette plugin (adapters/datasette_retention) through Datasette's own test
client: the pages show the CLI's numbers, the charts are the engine's, and Datasette's
permissions hold (view-instance; retention-view-customers for personal data)."""

import asyncio
import hashlib
import json
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from datasette.app import Datasette

from retention import charts
from retention.cli import cli
from retention.store import StoredEngine
from tests.adapters.dashboard import ALIAS, END, build, tables

ALLOWED = {"id": "analyst"}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return build(tmp_path_factory.mktemp("dashboard"))


def datasette(db, customers=None, **metadata):
    """Datasette on ``db``; ``customers``: the actors allowed customer pages."""
    plugin = {} if customers is None else {"allow-customers": customers}
    return Datasette([str(db)], metadata={"plugins": {"datasette-retention": plugin},
                                          **metadata})


def get(ds, path, actor=None, **params):
    async def fetch():
        cookies = {"ds_actor": ds.sign({"a": actor}, "actor")} if actor else {}
        return await ds.client.get(path, params=params, cookies=cookies)
    return asyncio.run(fetch())


def cli_json(*args):
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_plugin_is_loaded_from_datasettes_entry_point(db):
    plugins = get(datasette(db), "/-/plugins.json").json()
    (ours,) = [p for p in plugins if p["name"] == "datasette-retention"]
    assert {"register_routes", "permission_allowed"} <= set(ours["hooks"])
    assert ours["templates"]


def test_the_dashboard_shows_the_clis_numbers(db):
    page = get(datasette(db, customers=ALLOWED), "/-/retention", actor=ALLOWED, at=END)
    assert page.status_code == 200
    found, texts = tables(page.text)
    assert texts["retention-at"] == END
    risky = cli_json("at-risk", "--db", str(db), "--at", END)
    assert [r["customer"] for r in risky] == ["alice", "bob"]
    assert found["retention-at-risk"][1:] == [
        [r["customer"], r["level"] or "", f"{r['capital']:.2f}", r["last_event_at"],
         r["last_contact_at"]] for r in risky]
    plotted = cli_json("plot", "--db", str(db), "--distribution", "--at", END)
    assert found["retention-levels"][1:] == [
        *([name, str(len(capitals))] for name, capitals in plotted["by_level"]),
        ["prospect", "1"]]  # carol
    stats = cli_json("stats", "--db", str(db))
    assert found["retention-decisions"][1:] == [
        [d["action"], d["status"], str(d["count"])] for d in stats["decisions"]]
    assert found["retention-forces"][1:] == [
        [charts.FORCES.get(f["category"], "time"), f["category"], f"{f['added']:.2f}",
         f"{f['taken']:.2f}", str(f["entries"])] for f in stats["forces"]]
    pull = sum(f["added"] + f["taken"] for f in stats["forces"] if f["category"] == "pull")
    assert f"pull-away forces {pull:+.2f}" in texts["retention-totals"]
    assert f'src="/-/retention/distribution.svg?at={quote(END, safe="")}"' in page.text
    assert f'href="/-/retention/customers/alice?at={quote(END, safe="")}"' in page.text


def test_customer_ids_on_the_dashboard_need_the_permission(db):
    page = get(datasette(db), "/-/retention", at=END)
    assert page.status_code == 200
    found, texts = tables(page.text)
    risky = cli_json("at-risk", "--db", str(db), "--at", END)
    assert [row[:3] for row in found["retention-at-risk"][1:]] == [
        ["(hidden)", r["level"], f"{r['capital']:.2f}"] for r in risky]
    assert "retention-view-customers" in texts["retention-ids-hidden"]
    assert "alice" not in page.text and "/-/retention/customers/" not in page.text


@pytest.mark.parametrize("allow, actor", [
    (None, None),                # nothing configured: denied to everyone
    (None, ALLOWED),
    (ALLOWED, None),             # configured, but no actor
    (ALLOWED, {"id": "mallory"}),
])
def test_customer_pages_are_denied_unless_the_actor_is_allowed(db, allow, actor):
    ds = datasette(db, customers=allow)
    for path in ("/-/retention/customers/alice", "/-/retention/customers/alice/trajectory.svg"):
        page = get(ds, path, actor=actor, at=END)
        assert page.status_code == 403, path
        assert "alice" not in page.text.replace(path, "")
        assert "retention-view-customers" in page.text


def test_the_customer_page_shows_what_retention_customer_shows(db):
    shown = cli_json("customer", "--db", str(db), "alice", "--at", END)
    page = get(datasette(db, customers=ALLOWED), "/-/retention/customers/alice", actor=ALLOWED,
               at=END)
    assert page.status_code == 200
    found, texts = tables(page.text)
    assert texts["retention-capital"] == f"{shown['capital']:.2f}"
    assert texts["retention-level"] == shown["level"] == "rupture"
    assert found["retention-ledger"][1:-1] == [
        [e["at"], f"{e['points']:.2f}", e["rule"], e["category"],
         "yes" if e["settled"] else "no", e["reason"]] for e in shown["ledger"]]
    assert texts["retention-ledger-total"] == f"{shown['capital']:.2f}"  # it adds up
    assert f"<li>alice</li><li>{ALIAS}</li>" in page.text
    made = cli_json("decisions", "--db", str(db), "--customer", "alice")
    assert [(row[2], row[4]) for row in found["retention-customer-decisions"][1:]] == \
        [(d["action"], d["status"]) for d in made] == \
        [("flag_in_crm", "pending"), ("call_customer", "pending")]
    chart = f"/-/retention/customers/alice/trajectory.svg?at={quote(END, safe='')}"
    assert f'src="{chart}"' in page.text


def test_an_alias_in_the_url_finds_the_customer(db):
    page = get(datasette(db, customers=ALLOWED), "/-/retention/customers/" + quote(ALIAS, safe=""),
               actor=ALLOWED, at=END)
    assert page.status_code == 200
    assert tables(page.text)[1]["retention-customer"] == "alice"


def test_the_charts_served_are_the_engines_own(db):
    ds = datasette(db, customers=ALLOWED)
    trajectory = get(ds, "/-/retention/customers/alice/trajectory.svg", actor=ALLOWED, at=END)
    distribution = get(ds, "/-/retention/distribution.svg", at=END)
    with StoredEngine(db, read_only=True) as engine:
        expected_t = charts.render(charts.draw_trajectory(
            charts.trajectory(engine, "alice", END)), "svg")
        expected_d = charts.render(charts.draw_distribution(
            charts.distribution(engine, END)), "svg")
    for reply, expected in ((trajectory, expected_t), (distribution, expected_d)):
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "image/svg+xml"
        assert reply.content == expected
    assert b'<g id="capital">' in trajectory.content


def test_view_instance_is_honoured(db):
    ds = datasette(db, customers=ALLOWED, allow={"id": "root"})
    for path in ("/-/retention", "/-/retention/distribution.svg",
                 "/-/retention/customers/alice"):
        assert get(ds, path, actor=ALLOWED, at=END).status_code == 403, path
    assert get(ds, "/-/retention", actor={"id": "root"}, at=END).status_code == 200


def test_view_database_is_honoured(db):
    name = Path(db).stem
    ds = datasette(db, databases={name: {"allow": {"id": "root"}}})
    assert get(ds, "/-/retention", at=END).status_code == 403
    assert get(ds, "/-/retention", actor={"id": "root"}, at=END).status_code == 200


def test_mistakes_are_answered_plainly(db):
    ds = datasette(db, customers=ALLOWED)
    bad = get(ds, "/-/retention", at="yesterday")
    assert bad.status_code == 400 and "at:" in bad.text
    assert get(ds, "/-/retention/customers/nobody", actor=ALLOWED, at=END).status_code == 404
    assert get(ds, "/-/retention/customers/" + "x" * 600, actor=ALLOWED,
               at=END).status_code == 404
    assert get(ds, "/-/retention/customers/alice", actor=ALLOWED,
               at="2025-10-01T00:00:00").status_code == 400  # no zone
    prospect = get(ds, "/-/retention/customers/carol", actor=ALLOWED, at=END)
    assert prospect.status_code == 200
    assert tables(prospect.text)[1]["retention-capital"] == "not open (a prospect)"
    assert "trajectory.svg" not in prospect.text
    assert get(ds, "/-/retention/customers/carol/trajectory.svg", actor=ALLOWED,
               at=END).status_code == 404


def test_no_retention_database_is_a_404(tmp_path):
    import sqlite3

    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    reply = get(Datasette([str(other)]), "/-/retention")
    assert reply.status_code == 404 and "no retention database" in reply.text


def test_the_pages_never_write_the_database(db):
    def digest():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in Path(db).parent.glob(Path(db).name + "*") if not p.name.endswith("-shm")}
    before = digest()
    ds = datasette(db, customers=ALLOWED)
    for path in ("/-/retention", "/-/retention/customers/alice",
                 "/-/retention/customers/alice/trajectory.svg", "/-/retention/distribution.svg"):
        assert get(ds, path, actor=ALLOWED, at=END).status_code == 200
    assert digest() == before


def test_the_menu_links_to_the_dashboard(db):
    page = get(datasette(db), "/")
    assert '<a href="/-/retention">Retention</a>' in page.text
    as_root = get(datasette(db, allow={"id": "root"}), "/", actor={"id": "root"})
    assert '<a href="/-/retention">Retention</a>' in as_root.text
    assert get(datasette(db, allow={"id": "root"}), "/").status_code == 403


def test_charts_drawn_at_once_are_each_whole(db):
    ds = datasette(db, customers=ALLOWED)
    cookies = {"ds_actor": ds.sign({"a": ALLOWED}, "actor")}

    async def fetch_all():
        paths = ["/-/retention/customers/alice/trajectory.svg",
                 "/-/retention/distribution.svg"] * 3
        return await asyncio.gather(*(ds.client.get(p, params={"at": END}, cookies=cookies)
                                      for p in paths))
    replies = asyncio.run(fetch_all())
    assert all(r.status_code == 200 for r in replies)
    assert len({r.content for r in replies[0::2]}) == len({r.content for r in replies[1::2]}) == 1
