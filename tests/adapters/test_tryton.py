"""The Tryton module ``retention`` in a real Tryton, as Tryton modules are tested: a
scenario driven through proteus on a SQLite database with the module activated.

The database is made once per test session (``tryton`` below: Tryton's
``activate_modules``, which keeps a copy under ``DB_CACHE`` and restores it when the
same modules are asked again; set ``DB_CACHE`` to a folder that lasts to skip the
activation in later sessions). The engine is embedded, on its own SQLite file, with
the rules of tests/fixtures/tryton/rules.yaml; one test points the module at a real
``retention serve`` instead.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sqlite3
import time
import unittest
import urllib.parse
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from retention.cli import cli
from retention.store import StoredEngine

from .conftest import FIXTURES, stored

RULES = FIXTURES / "tryton" / "rules.yaml"
DB_NAME = "retention_scenario"


@pytest.fixture(scope="session")
def tryton(tmp_path_factory, request):
    """Tryton with the module activated, once per session: the proteus config, the
    engine's database, how long the activation took."""
    folder = tmp_path_factory.mktemp("tryton")
    settings = {
        "TRYTOND_DATABASE__URI": "sqlite://",
        "TRYTOND_DATABASE__PATH": str(folder),
        "DB_NAME": DB_NAME,
        "DB_CACHE": os.environ.get("DB_CACHE") or str(folder / "cache"),
        "TRYTOND_RETENTION__DB": str(folder / "retention.db"),
        "TRYTOND_RETENTION__RULES": str(RULES),
    }
    # importing trytond sets the process's time zone to UTC: put it back afterwards
    before = {k: os.environ.get(k) for k in [*settings, "TZ"]}
    os.environ.update(settings)
    from trytond.modules.account.tests.tools import create_chart
    from trytond.modules.company.tests.tools import create_company
    from trytond.tests.tools import activate_modules

    started = time.monotonic()
    config = activate_modules(["retention"], create_company, create_chart)
    seconds = time.monotonic() - started
    # said in the run's output (CI's log), past pytest's capture
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"tryton: database initialised in {seconds:.1f} s")
    yield SimpleNamespace(config=config, engine_db=Path(settings["TRYTOND_RETENTION__DB"]),
                          tryton_db=folder / f"{DB_NAME}.sqlite",
                          init_seconds=seconds)

    from trytond.modules.retention import engine
    engine.close()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    time.tzset()


# -- the scenario's steps, as a Tryton user takes them ----------------------------------

def model(name: str) -> Any:
    from proteus import Model
    return Model.get(name)


def party(name: str, email: str | None = None) -> Any:
    record = model("party.party")(name=name)
    if email:
        record.contact_mechanisms.new(type="email", value=email)
    record.save()
    return record


def confirmed_sale(customer: Any, *lines: tuple[int, str]) -> Any:
    sale = model("sale.sale")(party=customer)
    for quantity, price in lines:
        line = sale.lines.new()
        line.description = "Nappies"
        line.quantity = quantity
        line.unit_price = Decimal(price)
    sale.click("quote")
    sale.click("confirm")
    return sale


def complaint_on(sale: Any, description: str, *, returning: bool = False) -> Any:
    Type = model("sale.complaint.type")
    kind = Type.find([("name", "=", "Sale")])
    if not kind:
        kind = [Type(name="Sale", origin=model("ir.model").find(
            [("name", "=", "sale.sale")])[0])]
        kind[0].save()
    complaint = model("sale.complaint")(customer=sale.party, type=kind[0], origin=sale,
                                        description=description)
    if returning:
        complaint.actions.new(action="sale_return")
    complaint.save()
    complaint.click("wait")
    return complaint


def run_cron(method: str, at: dt.datetime) -> None:
    """Run one of the module's crons now, as an administrator's "Run Once" does, with
    the engine read at ``at``."""
    from proteus import config as proteus_config
    # (a record keeps the context it was read with)
    with proteus_config.get_config().set_context(retention_at=at):
        cron, = model("ir.cron").find([("method", "=", method)])
        cron.click("run_once")


def seen_at(record: Any, at: dt.datetime) -> Any:
    """The party as its form shows it at ``at``."""
    from proteus import config as proteus_config
    with proteus_config.get_config().set_context(retention_at=at):
        return model("party.party")(record.id)


def outbox(party_id: int | None = None) -> list[Any]:
    domain = [("party", "=", party_id)] if party_id is not None else []
    return model("retention.event").find(domain, order=[("id", "ASC")])


def cli_customer(db: Path, customer: str, at: dt.datetime) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["customer", customer, "--db", str(db),
                                      "--at", at.isoformat(), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def notes_of(record: Any) -> list[str]:
    return [n.message for n in model("ir.note").find([("resource", "=", str(record))])]


# -- the tests ----------------------------------------------------------------------------

def test_the_module_is_found_through_trytond_entry_point(tryton):
    from importlib.metadata import entry_points

    found = {ep.name: ep.value for ep in entry_points(group="trytond.modules")}
    assert found["retention"] == "trytond.modules.retention"
    module, = model("ir.module").find([("name", "=", "retention")])
    assert module.state == "activated"
    # a first activation takes half a minute on SQLite; a restored copy, less
    assert tryton.init_seconds < 120


def test_scenario_sales_complaint_silence_rupture_delivered(tryton):
    ann = party("Ann", "Ann@Example.com")
    bob = party("Bob", "bob@example.com")
    first = confirmed_sale(ann, (2, "10"), (1, "5.50"))
    confirmed_sale(ann, (1, "30"))
    confirmed_sale(bob, (3, "4"))
    complaint = complaint_on(first, "The second pack was torn open.")

    # a sale confirmed in a transaction that then fails sends nothing
    rolled = rolled_back_sale(ann)

    events = {e["id"]: e for e in stored(tryton.engine_db, "tryton")}
    ann_events = [e for e in events.values() if e["customer"] == "email:ann@example.com"]
    assert sorted(e["type"] for e in ann_events) == ["complaint", "purchase", "purchase"]
    sale_event = events[f"sale:{first.id}"]
    assert sale_event["amount"] == 25.5 and sale_event["lines"] == 2
    assert sale_event["order_id"] == first.number
    assert events[f"complaint:{complaint.id}"]["text"] == "The second pack was torn open."
    assert events[f"complaint:{complaint.id}"]["ticket_id"] == str(complaint.id)
    assert f"sale:{rolled}" not in events
    assert not model("retention.event").find([("event_id", "=", f"sale:{rolled}")])
    assert all(e.state == "posted" for e in outbox(ann.id))
    # confirmed, then processed by Tryton after the commit: one event all the same
    assert first.state == "processing"
    assert len(model("retention.event").find([("event_id", "=", f"sale:{first.id}")])) == 1

    # posted again (as after a crash between posting and marking them posted): the
    # engine counts each once
    with sqlite3.connect(tryton.tryton_db) as conn:
        conn.execute("UPDATE retention_event SET state = 'pending' WHERE party = ?",
                     [ann.id])
    conn.close()
    run_cron("retention.event|post_pending", dt.datetime.now(dt.UTC))
    assert all(e.state == "posted" for e in outbox(ann.id))
    assert len(stored(tryton.engine_db, "tryton")) == len(events)

    # time passes: a month of grace, then a point a day, through watch (day 33) and
    # rupture (day 53), each delivered while fresh, as the crons do it
    opened = dt.datetime.fromisoformat(events[f"sale:{first.id}"]["at"])
    for day in (33, 53):
        later = opened + dt.timedelta(days=day)
        run_cron("retention.engine|tick", later)
        run_cron("retention.engine|deliver", later)

    shown = seen_at(ann, later)
    expected = cli_customer(tryton.engine_db, f"tryton:{ann.id}", later)
    with StoredEngine(tryton.engine_db) as engine:
        assert engine.capital("email:ann@example.com", later) == expected["capital"]
        decisions = engine.decisions("email:ann@example.com")
    assert shown.retention_capital == pytest.approx(expected["capital"], abs=0.005)
    assert shown.retention_capital < 40
    assert shown.retention_level == expected["level"] == "rupture"
    assert shown.retention_customer == "email:ann@example.com"
    assert "complaint (incident)" in shown.retention_ledger
    assert len(shown.retention_ledger.splitlines()) == len(expected["ledger"])

    # decisions came back: a category per level, one note per task
    assert sorted((d.action, d.rule, d.status) for d in decisions) == [
        ("call_customer", "rupture", "sent"), ("flag_in_crm", "rupture", "sent"),
        ("flag_in_crm", "watch", "sent")]
    assert sorted(c.rec_name for c in shown.categories) == [
        "Retention / rupture", "Retention / watch"]
    task, = (d for d in decisions if d.via == "crm_task")
    notes = notes_of(ann)
    assert len(notes) == 1 and notes[0].endswith(f"[retention decision {task.id}]")
    assert "call_customer (rupture)" in notes[0]

    # delivered again, as after a crash between the sink's work and the engine's
    # "sent" (each decision left sending, its lease over), by `retention deliver` outside
    # Tryton: still one note, the categories as they were
    with sqlite3.connect(tryton.engine_db) as conn:
        conn.execute("UPDATE decisions SET status = 'sending', lease_until = 0"
                     " WHERE customer = 'email:ann@example.com'")
    conn.close()
    result = CliRunner().invoke(cli, [
        "deliver", "--db", str(tryton.engine_db),
        "--route", "crm_tag=tryton", "--route", "crm_task=tryton",
        "--set", f"tryton.database={DB_NAME}", "--now", later.isoformat()])
    assert result.exit_code == 0, result.output
    assert "sent 3" in result.output
    assert len(notes_of(ann)) == 1
    assert len(seen_at(ann, later).categories) == 2

    # the parties at risk, most urgent first, as `retention at-risk` ranks them
    with StoredEngine(tryton.engine_db) as engine:
        ranked = [r["customer"] for r in engine.at_risk(now=later)]
    listed = at_risk_list(later)
    assert [p.retention_customer for p in listed] == ranked
    assert [p.id for p in listed][:2] == [ann.id, bob.id]
    assert [p.retention_rank for p in listed] == list(range(1, len(listed) + 1))


def test_return_sale_and_resolved_complaint(tryton):
    cid = party("Chloe", "chloe@example.com")
    sale = confirmed_sale(cid, (4, "12"))
    complaint = complaint_on(sale, "Wrong size.", returning=True)
    complaint.click("approve")  # Tryton processes it after the commit: done
    complaint.reload()
    assert complaint.state == "done"
    back = complaint.actions[0].result
    back.click("quote")
    back.click("confirm")

    events = {e["id"]: e for e in stored(tryton.engine_db, "tryton")}
    resolved = events[f"resolved:{complaint.id}"]
    assert resolved["type"] == "ticket_resolved"
    assert resolved["ticket_id"] == events[f"complaint:{complaint.id}"]["ticket_id"]
    returned = events[f"return:{back.id}"]
    assert returned["type"] == "return" and returned["amount"] == 48.0
    assert f"sale:{back.id}" not in events
    ledger = seen_at(cid, dt.datetime.now(dt.UTC)).retention_ledger
    assert "complaint_resolved (recovery)" in ledger and "returned (incident)" in ledger


def test_a_credit_note_is_a_return(tryton):
    from trytond.modules.account.tests.tools import create_fiscalyear, get_accounts
    from trytond.modules.account_invoice.tests.tools import set_fiscalyear_invoice_sequences

    fiscalyear = set_fiscalyear_invoice_sequences(create_fiscalyear())
    fiscalyear.click("create_period")
    fay = party("Fay", "fay@example.com")
    confirmed_sale(fay, (1, "40"))
    credit = model("account.invoice")(type="out", party=fay)
    line = credit.lines.new()
    line.account = get_accounts()["revenue"]
    line.description = "Goodwill refund"
    line.quantity = -1
    line.unit_price = Decimal("15")
    credit.click("post")
    assert credit.state == "posted" and credit.total_amount == Decimal("-15.00")

    events = {e["id"]: e for e in stored(tryton.engine_db, "tryton")}
    refund = events[f"credit:{credit.id}"]
    assert refund["type"] == "return" and refund["amount"] == 15.0
    assert refund["customer"] == "email:fay@example.com"
    assert refund["order_id"] == credit.number


def test_a_customer_who_is_no_party_fails_for_good(tryton):
    # another platform's customer, in the same engine: nothing of theirs is in Tryton
    now = dt.datetime.now(dt.UTC)
    with StoredEngine(tryton.engine_db) as engine:
        engine.ingest([{"id": "order:9001", "customer": "email:zed@example.com",
                        "type": "purchase", "at": (now - dt.timedelta(days=35)).isoformat(),
                        "amount": 20}], source="shopify")
    later = now + dt.timedelta(days=10)  # silence crossed watch three days before
    run_cron("retention.engine|tick", later)
    run_cron("retention.engine|deliver", later)
    with StoredEngine(tryton.engine_db) as engine:
        decision, = engine.decisions("email:zed@example.com")
        failed = engine.db.execute("SELECT status, reason, next_try FROM decisions"
                                   " WHERE id = ?", [decision.id]).fetchone()
    assert failed[0] == "failed" and "is no Tryton party" in failed[1]
    assert failed[2] is None  # never tried again


def test_a_party_without_email_is_its_tryton_id_until_it_has_one(tryton):
    dan = party("Dan")
    confirmed_sale(dan, (1, "8"))
    assert seen_at(dan, dt.datetime.now(dt.UTC)).retention_customer == f"tryton:{dan.id}"
    dan.contact_mechanisms.new(type="email", value="dan@example.com")
    dan.save()
    shown = seen_at(dan, dt.datetime.now(dt.UTC))
    assert shown.retention_customer == "email:dan@example.com"
    assert shown.retention_capital == 72.0  # the purchase made before the address


def test_an_engine_down_never_blocks_a_sale_and_is_retried(tryton, start, db):
    from trytond import config

    # nothing listens on that port: posting fails, the sale is confirmed all the same
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    config.set("retention", "url", f"http://127.0.0.1:{closed}")
    try:
        eve = party("Eve", "eve@example.com")
        sale = confirmed_sale(eve, (1, "19.90"))
        assert sale.state in {"confirmed", "processing"}
        waiting = outbox(eve.id)
        assert waiting and all(e.state == "pending" for e in waiting)
        # the first that failed says why; those after it were left to the cron
        assert waiting[0].attempts == 1 and "127.0.0.1" in waiting[0].error
        assert all(e.attempts == 0 for e in waiting[1:])

        # the server is up now: the cron posts them, signed and with the token
        server = start({"standard.secret": "a-shared-secret"}, token="t0ken")
        config.set("retention", "url", f"http://127.0.0.1:{server.port}")
        config.set("retention", "token", "t0ken")
        config.set("retention", "secret", "a-shared-secret")
        run_cron("retention.event|post_pending", dt.datetime.now(dt.UTC))
        assert all(e.state == "posted" for e in outbox(eve.id))
        remote = stored(db, "tryton")
        assert [e["id"] for e in remote if e["type"] == "purchase"] == [f"sale:{sale.id}"]
        # the form reads the remote engine: the retail rules' capital after a purchase
        moment = dt.datetime.now(dt.UTC)
        profile = server.get(f"/customers/tryton:{eve.id}?at="
                             + urllib.parse.quote(moment.isoformat()),
                             headers={"authorization": "Bearer t0ken"})
        assert profile.status == 200
        shown = seen_at(eve, moment)
        assert shown.retention_capital == profile.body["capital"] == 72.0

        # the parties at risk need the embedded engine: the user is told so
        from trytond.exceptions import UserError
        with pytest.raises(UserError, match="embedded engine"):
            model("party.party").find([("retention_rank", "!=", None)])

        # a wrong secret is refused by the server: the events stay pending
        config.set("retention", "secret", "another-secret")
        late = confirmed_sale(eve, (1, "5"))
        refused = [e for e in outbox(eve.id) if e.event_id == f"sale:{late.id}"]
        assert refused and refused[0].state == "pending" and "401" in refused[0].error
    finally:
        for key in ("url", "token", "secret"):
            config.set("retention", key, "")


# -- helpers that speak to Tryton below proteus ----------------------------------------

class Boom(Exception):
    pass


def rolled_back_sale(customer: Any) -> int:
    """A sale quoted and confirmed in a transaction that then fails (a later step of
    the same request raised): Tryton rolls it all back. Its id."""
    sale = model("sale.sale")(party=customer)
    line = sale.lines.new()
    line.description = "Wipes"
    line.quantity = 1
    line.unit_price = Decimal("3")
    sale.save()
    from trytond.pool import Pool
    from trytond.transaction import Transaction

    with pytest.raises(Boom), Transaction().start(DB_NAME, 1):
        Sale = Pool().get("sale.sale")
        records = Sale.browse([sale.id])
        Sale.quote(records)
        Sale.confirm(records)
        assert Pool().get("retention.event").search(
            [("event_id", "=", f"sale:{sale.id}")])  # written, inside
        raise Boom
    sale.reload()
    assert sale.state == "draft"
    return sale.id


def at_risk_list(at: dt.datetime) -> list[Any]:
    """The parties the action "Parties at Risk" lists, with its domain and order."""
    from proteus import config as proteus_config
    from trytond.pyson import PYSONDecoder

    action, = model("ir.action.act_window").find([("name", "=", "Parties at Risk")])
    domain = PYSONDecoder().decode(action.pyson_domain)
    order = PYSONDecoder().decode(action.pyson_order)
    with proteus_config.get_config().set_context(retention_at=at):
        return model("party.party").find(domain, order=order)



# -- Tryton's own checks of a module ---------------------------------------------------

def test_tryton_module_checks(tryton):
    """The checks Tryton runs on every module (``ModuleTestCase``: views, field methods
    and depends, access, actions, menus, XML files...), on the session's database,
    where the module is activated (ModuleTestCase's own set-up would make another)."""
    from trytond.tests.test_tryton import ModuleTestCase

    class RetentionModule(ModuleTestCase):
        module = "retention"

    checks = sorted(name for name in dir(ModuleTestCase) if name.startswith("test_"))
    result = unittest.TestResult()
    for check in checks:
        RetentionModule(check).run(result)
    assert result.testsRun == len(checks) > 20
    problems = [f"{case.id()}: {trace}" for case, trace in result.failures + result.errors]
    assert not problems, "\n".join(problems)
