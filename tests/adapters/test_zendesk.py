"""Zendesk (retention_adapters.zendesk): its event webhooks, signed in the test as
Zendesk documents (base64 HMAC-SHA256 of the signature timestamp + the body), posted
to a real server; the sink against Zendesk's Tickets API on loopback
(tests/adapters/platforms.py), checked against its documentation: paths, methods,
basic auth with an API token, the JSON shapes; 429 with Retry-After, 503, and a
ticket already opened."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from retention import plugins
from retention.cli import cli
from retention.delivery import Deliverer, Settings
from retention.store import StoredEngine

from .conftest import aliases, count, fixture, fixture_json, rows, stored
from .platforms import Answer, PlatformApi

SECRET = "dGhlIHdlYmhvb2sgc2lnbmluZyBzZWNyZXQ"
AGENT = "agent@shop.example"
TOKEN = "6wiIBWbGkBMo1mRDMuVwkw1EPsNkeUj95PIz2akv"


def signed(body: bytes, *, secret: str = SECRET, at: float | None = None,
           stamp: str | None = None) -> dict[str, str]:
    """Zendesk's headers: base64(HMACSHA256(TIMESTAMP + BODY)), the timestamp ISO-8601."""
    if stamp is None:
        moment = datetime.fromtimestamp(time.time() if at is None else at, UTC)
        stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = hmac.new(secret.encode(), stamp.encode() + body, hashlib.sha256).digest()
    return {"X-Zendesk-Webhook-Signature": base64.b64encode(digest).decode(),
            "X-Zendesk-Webhook-Signature-Timestamp": stamp,
            "X-Zendesk-Webhook-Id": "01GK8E6BKWMJZD2T8Y5AXJQMG5"}


def post(server, name: str):
    body = fixture("zendesk", name)
    return server.post("/hooks/zendesk", raw=body, headers=signed(body))


def purchase(server, customer: str, at: str):
    """A purchase, through POST /events, so the relationship is open."""
    reply = server.post("/events", {"id": "order-1", "customer": customer,
                                    "type": "purchase", "at": at, "amount": 40})
    assert reply.status == 200, reply.body


# -- the source ----------------------------------------------------------------------------

def test_a_user_event_with_an_email_links_the_zendesk_id(start, db):
    server = start({"zendesk.secret": SECRET})
    reply = post(server, "user_created.json")
    assert (reply.status, reply.body["identified"]) == (200, 1)
    assert aliases(db) == {"zendesk:20978392": "email:jane.doe@example.com"}


def test_a_ticket_created_is_a_complaint_and_solved_a_resolution_the_rules_recover(
        start, db):
    server = start({"zendesk.secret": SECRET})
    assert post(server, "user_created.json").status == 200
    purchase(server, "email:jane.doe@example.com", "2026-03-01T12:00:00Z")
    reply = post(server, "ticket_created.json")
    assert (reply.status, reply.body["new"]) == (200, 1), reply.body
    reply = post(server, "ticket_solved.json")
    assert (reply.status, reply.body["new"]) == (200, 1), reply.body
    complaint, resolved = stored(db, "zendesk")
    description = fixture_json("zendesk", "ticket_created.json")["detail"]["description"]
    assert complaint == {"id": "01HQ8W5ZK3PX7J3G0R5M2T1ABC", "type": "complaint",
                         "customer": "email:jane.doe@example.com", "source": "zendesk",
                         "at": "2026-03-02T10:00:00+00:00", "ticket_id": "35436",
                         "subject": "Broken lid on order #1001", "text": description,
                         "priority": "high"}
    assert resolved == {"id": "01HQCZ9R4V2YB8N6T0E3W5SOLV", "type": "ticket_resolved",
                        "customer": "email:jane.doe@example.com", "source": "zendesk",
                        "at": "2026-03-04T10:00:00+00:00", "ticket_id": "35436"}
    # the retail rules: the complaint cost points, its resolution two days later paid
    # them back (and its bonus)
    ledger = rows(db, "SELECT rule, points, event_id FROM ledger WHERE customer = ?"
                      " ORDER BY seq", "email:jane.doe@example.com")
    assert ("complaint", -12.0, complaint["id"]) in ledger
    recovered = [p for r, p, e in ledger if r == "complaint_resolved" and e == resolved["id"]]
    assert sum(recovered) > 12, ledger
    # Zendesk's redelivery of an event counts once
    reply = post(server, "ticket_solved.json")
    assert (reply.status, reply.body["duplicates"], reply.body["new"]) == (200, 1, 0)


def test_without_a_user_event_the_complaint_is_on_the_zendesk_id(start, db):
    server = start({"zendesk.secret": SECRET})
    assert post(server, "ticket_created.json").status == 200
    [complaint] = stored(db)
    assert complaint["customer"] == "zendesk:20978392"
    # the address comes later: the complaint moves to the customer of that address
    assert post(server, "user_created.json").status == 200
    assert aliases(db) == {"zendesk:20978392": "email:jane.doe@example.com"}
    assert [e["customer"] for e in stored(db)] == ["email:jane.doe@example.com"]


def test_a_satisfaction_rating_is_a_review(start, db):
    server = start({"zendesk.secret": SECRET})
    reply = post(server, "satisfaction_good.json")
    assert (reply.status, reply.body["new"]) == (200, 1), reply.body
    [review] = stored(db)
    assert (review["type"], review["rating"], review["ticket_id"], review["text"]) == (
        "review", 5, "35436", "Sorted out in two days, thank you!")
    bad = fixture_json("zendesk", "satisfaction_good.json")
    bad["id"] = "01HQD0RAT1NG0000000000BAD0"
    bad["detail"] = {**bad["detail"], "id": "35437"}  # another ticket
    bad["event"]["current"] = {"id": "1235", "score": "bad", "comment": None}
    body = json.dumps(bad).encode()
    reply = server.post("/hooks/zendesk", raw=body, headers=signed(body))
    assert (reply.status, reply.body["new"]) == (200, 1), reply.body
    assert [e.get("rating") for e in stored(db)] == [5, 1]
    # the same ticket rated again (good, bad, good...): one review per ticket
    for n, score in enumerate(("bad", "good", "bad")):
        toggled = dict(bad, id=f"01HQD0RAT1NG00000000TOGGLE{n}", detail={
            **bad["detail"], "id": "35437"}, event={"current": {"score": score}})
        body = json.dumps(toggled).encode()
        reply = server.post("/hooks/zendesk", raw=body, headers=signed(body))
        assert reply.status == 200 and reply.body["new"] == 0, reply.body
    assert [e["id"] for e in stored(db)] == ["review:35436", "review:35437"]
    offered = dict(bad, id="01HQD0RAT1NG000000000OFFER", event={"current": "offered"})
    body = json.dumps(offered).encode()
    reply = server.post("/hooks/zendesk", raw=body, headers=signed(body))
    assert (reply.status, reply.body["ignored"]) == (200, 1)


@pytest.mark.parametrize("name", ["ticket_pending.json", "organization_created.json"])
def test_what_is_not_mapped_is_200_and_ignored(start, db, name):
    server = start({"zendesk.secret": SECRET})
    reply = post(server, name)
    assert (reply.status, reply.body["ignored"], reply.body["new"]) == (200, 1, 0)
    assert (count(db, "events"), count(db, "dead_letters")) == (0, 0)


@pytest.mark.parametrize("tamper", ["secret", "body", "stale", "future", "missing",
                                    "no timestamp", "other timestamp", "naive", "digits"])
def test_a_wrong_or_stale_signature_is_401_and_nothing_is_stored(start, db, tamper):
    server = start({"zendesk.secret": SECRET})
    body = fixture("zendesk", "ticket_created.json")
    good = signed(body)
    headers = {
        "secret": lambda: signed(body, secret="another secret"),
        "body": lambda: signed(body.replace(b"Broken", b"Fine")),
        "stale": lambda: signed(body, at=time.time() - 301),
        "future": lambda: signed(body, at=time.time() + 301),
        "missing": lambda: {k: v for k, v in good.items()
                            if k != "X-Zendesk-Webhook-Signature"},
        "no timestamp": lambda: {k: v for k, v in good.items()
                                 if k != "X-Zendesk-Webhook-Signature-Timestamp"},
        # the signature of another moment than the one the header says
        "other timestamp": lambda: {**signed(body, at=time.time() - 60),
                                    "X-Zendesk-Webhook-Signature-Timestamp":
                                        good["X-Zendesk-Webhook-Signature-Timestamp"]},
        "naive": lambda: signed(body, stamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")),
        "digits": lambda: signed(body, stamp=str(int(time.time()))),
    }[tamper]()
    reply = server.post("/hooks/zendesk", raw=body, headers=headers)
    assert reply.status == 401, reply.body
    assert (count(db, "events"), count(db, "aliases"), count(db, "dead_letters")) == (0, 0, 0)


@pytest.mark.parametrize(("change", "reason"), [
    (lambda p: p.pop("type"), "no type"),
    (lambda p: p.update(type="ticket.created"), "not a Zendesk event type"),
    (lambda p: p["detail"].pop("requester_id"), "detail.requester_id"),
    (lambda p: p["detail"].update(id=["35436"]), "detail.id is list"),
    (lambda p: p.update(time="2026-03-02 10:00:00"), "time has no time zone"),
    (lambda p: p["detail"].update(requester_id="20978392\r\nX: y"), "customer id"),
])
def test_a_body_that_is_not_zendesks_is_400_and_kept_as_a_dead_letter(start, db, change,
                                                                      reason):
    server = start({"zendesk.secret": SECRET})
    payload = fixture_json("zendesk", "ticket_created.json")
    change(payload)
    body = json.dumps(payload).encode()
    reply = server.post("/hooks/zendesk", raw=body, headers=signed(body))
    assert reply.status == 400 and reason in reply.body["error"], reply.body
    [(why, retriable)] = rows(db, "SELECT reason, retriable FROM dead_letters")
    assert reason in why and retriable == 0
    assert count(db, "events") == 0


def test_an_array_is_not_a_zendesk_body(start, db):
    server = start({"zendesk.secret": SECRET})
    body = b"[" + fixture("zendesk", "ticket_created.json") + b"]"
    reply = server.post("/hooks/zendesk", raw=body, headers=signed(body))
    assert reply.status == 400 and "one event" in reply.body["error"]


def test_a_long_description_is_cut(start, db):
    server = start({"zendesk.secret": SECRET})
    payload = fixture_json("zendesk", "ticket_created.json")
    payload["detail"]["description"] = "x" * 100_000
    body = json.dumps(payload).encode()
    assert server.post("/hooks/zendesk", raw=body, headers=signed(body)).status == 200
    assert len(stored(db)[0]["text"]) == 4000


# -- Zendesk's Tickets API on loopback ------------------------------------------------------

class Zendesk:
    def __init__(self) -> None:
        self.tickets: list[dict] = []
        login = base64.b64encode(f"{AGENT}/token:{TOKEN}".encode()).decode()
        self.api = PlatformApi([
            ("GET", r"/api/v2/tickets\.json", self.list_tickets),
            ("POST", r"/api/v2/tickets\.json", self.create_ticket),
        ], auth=f"Basic {login}")

    def list_tickets(self, call, match):
        [external_id] = call.query["external_id"]
        found = [t for t in self.tickets if t["external_id"] == external_id]
        return Answer(200, {"tickets": found, "next_page": None, "previous_page": None,
                            "count": len(found)})

    def create_ticket(self, call, match):
        ticket = call.body["ticket"]
        assert isinstance(ticket["subject"], str) and len(ticket["subject"]) <= 150
        assert isinstance(ticket["comment"]["body"], str) and ticket["comment"]["body"]
        assert isinstance(ticket["external_id"], str) and ticket["external_id"]
        assert "@" in ticket["requester"]["email"] and ticket["requester"]["name"]
        assert isinstance(ticket.get("group_id", 0), int)
        assert ticket.get("priority") in (None, "urgent", "high", "normal", "low")
        assert all(" " not in tag for tag in ticket.get("tags", []))
        created = {**ticket, "id": 35500 + len(self.tickets), "status": "new",
                   "url": f"{self.api.url}/api/v2/tickets/{35500 + len(self.tickets)}.json"}
        self.tickets.append(created)
        return Answer(201, {"ticket": created}, {"location": created["url"]})


@pytest.fixture
def zendesk():
    platform = Zendesk()
    platform.api.start()
    yield platform
    platform.api.stop()
    assert platform.api.problems == []


RULES = """\
capital: {initial: 70, min: 0, max: 100, opens_on: [purchase]}
rules:
  complaint:
    when: event.type == "complaint"
    points: -5
    then: [call_customer]
actions:
  call_customer: {kind: service, via: crm_task}
"""


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def shop(tmp_path):
    """A database where ann and bob each made a complaint: a crm_task decision each."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    path = tmp_path / "desk.db"
    day = datetime.now(UTC) - timedelta(days=1)
    engine = StoredEngine(path, rules)
    engine.ingest([{"id": f"{who}-{n}", "customer": f"email:{who}@example.com", "type": kind,
                    "at": (day + timedelta(minutes=n)).isoformat()}
                   for who in ("ann", "bob")
                   for n, kind in enumerate(("purchase", "complaint"))])
    engine.close()
    return path, rules


def settings_of(zendesk: Zendesk, **more: str) -> dict[str, str]:
    return {"zendesk.api_url": zendesk.api.url, "zendesk.email": AGENT,
            "zendesk.token": TOKEN, "zendesk.group_id": "98738",
            **{f"zendesk.{k}": v for k, v in more.items()}}


def deliver(path, rules, zendesk, clock, **more):
    engine = StoredEngine(path, rules)
    try:
        return Deliverer(engine, plugins.sinks(), routes={"crm_task": "zendesk"},
                         settings=Settings(settings_of(zendesk, **more), environ={}),
                         clock=clock).run()
    finally:
        engine.close()


def decision_ids(path):
    return {i for (i,) in rows(path, "SELECT id FROM decisions WHERE via = 'crm_task'")}


def test_crm_task_opens_one_ticket_per_decision_assigned_to_the_group(shop, zendesk):
    path, rules = shop
    report = deliver(path, rules, zendesk, Clock())
    assert (report.sent, report.failed) == (2, 0), report.errors
    assert {t["external_id"] for t in zendesk.tickets} == decision_ids(path)
    assert {t["requester"]["email"] for t in zendesk.tickets} == {"ann@example.com",
                                                                  "bob@example.com"}
    assert {t["group_id"] for t in zendesk.tickets} == {98738}
    assert all(t["comment"]["public"] is False and t["external_id"] in t["comment"]["body"]
               for t in zendesk.tickets)
    # looked up by external id before each creation
    assert len(zendesk.api.made("GET", r"/api/v2/tickets\.json")) == 2


def test_a_ticket_already_opened_is_found_and_not_opened_again(shop, zendesk):
    path, rules = shop
    first = sorted(decision_ids(path))[0]
    zendesk.tickets.append({"id": 1, "external_id": first, "subject": "from a lost answer"})
    report = deliver(path, rules, zendesk, Clock())
    assert (report.sent, report.failed) == (2, 0), report.errors
    assert [t["external_id"] for t in zendesk.tickets].count(first) == 1
    assert len(zendesk.api.made("POST", r"/api/v2/tickets\.json")) == 1


def test_429_waits_as_asked_503_is_retried_and_each_ticket_opens_once(shop, zendesk):
    path, rules = shop
    clock = Clock()
    zendesk.api.script(429, {"Retry-After": "60"})
    report = deliver(path, rules, zendesk, clock)
    assert report.sent == 0 and report.paused, report
    [(next_try,)] = rows(path, "SELECT next_try FROM decisions WHERE status = 'failed'")
    assert next_try >= clock.now + 60
    clock.now += 61
    zendesk.api.script(503)
    report = deliver(path, rules, zendesk, clock)
    assert (report.sent, report.failed) == (1, 1), report
    clock.now += 3600
    report = deliver(path, rules, zendesk, clock)
    assert (report.sent, report.failed) == (1, 0), report
    assert sorted(t["external_id"] for t in zendesk.tickets) == sorted(decision_ids(path))


def test_a_refused_token_fails_for_good(shop, zendesk):
    path, rules = shop
    report = deliver(path, rules, zendesk, Clock(), token="wrong")
    assert report.sent == 0 and any("401" in e for e in report.errors), report
    assert rows(path, "SELECT DISTINCT next_try FROM decisions") == [(None,)]
    assert zendesk.tickets == []


def test_the_subdomain_gives_the_api_url(tmp_path):
    from retention_adapters.zendesk import ZendeskSink

    sink = ZendeskSink(Settings({"zendesk.subdomain": "acme", "zendesk.email": AGENT,
                                 "zendesk.token": TOKEN}, environ={}))
    assert sink.base == "https://acme.zendesk.com"
    from retention.delivery import SettingError

    with pytest.raises(SettingError, match="subdomain"):
        ZendeskSink(Settings({"zendesk.subdomain": "acme.evil.example/x",
                              "zendesk.email": AGENT, "zendesk.token": TOKEN}, environ={}))


def test_retention_deliver_routes_crm_task_to_zendesk(shop, zendesk):
    path, rules = shop
    sets = [part for key, value in settings_of(zendesk).items()
            for part in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(cli, ["deliver", "--db", str(path), "--rules", str(rules),
                                      "--route", "crm_task=zendesk", *sets])
    assert result.exit_code == 0, result.output
    assert len(zendesk.tickets) == 2
    check = CliRunner().invoke(cli, ["check", str(rules), "--route", "crm_task=zendesk"])
    assert check.exit_code == 0 and "warning" not in check.output, check.output
