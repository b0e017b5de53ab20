"""HubSpot (retention_adapters.hubspot): its webhooks, signed in the test with HubSpot's
v3 algorithm, posted to a real server; the deal lookups and the sink against HubSpot's
CRM API on loopback (tests/adapters/platforms.py), checked against its documentation:
paths, methods, the bearer token, the JSON shapes; 429 with Retry-After, 503, and a
task already created."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from retention import plugins
from retention.cli import cli
from retention.delivery import Deliverer, Settings
from retention.store import StoredEngine

from .conftest import aliases, count, fixture, rows, stored
from .platforms import Answer, PlatformApi

SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
TOKEN = "pat-na1-11111111-2222-3333-4444-555555555555"
URL = "https://retention.shop.example/hooks/hubspot"
#: the dead letters, each with the source a retry hands it back to (resend_to)
LETTERS = ("dead_letters LEFT JOIN (SELECT seq, source AS resend_to FROM"
           " dead_letter_sources) USING (seq)")


def signed(body: bytes, *, url: str = URL, secret: str = SECRET,
           at: float | None = None) -> dict[str, str]:
    """HubSpot's v3 headers, as its docs say: base64(HMAC-SHA256(secret, method + URI +
    body + timestamp)), the timestamp in milliseconds, the URI with %3A, %2F, %3F, %40,
    %21, %24, %27, %28, %29, %2A, %2C and %3B decoded."""
    stamp = str(int((time.time() if at is None else at) * 1000))
    for encoded, char in (("%3A", ":"), ("%2F", "/"), ("%3F", "?"), ("%40", "@"),
                          ("%21", "!"), ("%24", "$"), ("%27", "'"), ("%28", "("),
                          ("%29", ")"), ("%2A", "*"), ("%2C", ","), ("%3B", ";")):
        url = url.replace(encoded, char)
    source = b"POST" + url.encode() + body + stamp.encode()
    digest = hmac.new(secret.encode(), source, hashlib.sha256).digest()
    return {"X-HubSpot-Signature-v3": base64.b64encode(digest).decode(),
            "X-HubSpot-Request-Timestamp": stamp, "X-HubSpot-Signature-Version": "v3"}


# -- HubSpot's CRM API on loopback ---------------------------------------------------------

class HubSpot:
    """The CRM objects the API serves: deals with their contacts, contacts, tasks."""

    def __init__(self) -> None:
        self.deals = {"9001": {"amount": "1500.00", "deal_currency_code": "eur",
                               "closedate": "2019-07-27T04:00:00Z", "contacts": ["678"]}}
        self.contacts = {"678": {"email": "bo.ling@example.org"},
                         "42": {"email": "ann@example.com"}}
        self.tasks: list[dict] = []
        self.api = PlatformApi([
            ("GET", r"/crm/v4/objects/deals/(\d+)/associations/contacts", self.associations),
            ("GET", r"/crm/v3/objects/deals/(\d+)", self.deal),
            ("GET", r"/crm/v3/objects/contacts/(\d+)", self.contact),
            ("PATCH", r"/crm/v3/objects/contacts/(\d+)", self.update_contact),
            ("POST", r"/crm/v3/objects/contacts/search", self.search_contacts),
            ("POST", r"/crm/v3/objects/tasks/search", self.search_tasks),
            ("POST", r"/crm/v3/objects/tasks", self.create_task),
        ], auth=f"Bearer {TOKEN}")

    def associations(self, call, match):
        deal = self.deals.get(match[1])
        if deal is None:
            return Answer(404, {"status": "error", "category": "OBJECT_NOT_FOUND"})
        return Answer(200, {"results": [
            {"toObjectId": int(c), "associationTypes": [
                {"category": "HUBSPOT_DEFINED", "typeId": 3, "label": None}]}
            for c in deal["contacts"]]})

    def deal(self, call, match):
        assert call.query["properties"] == ["amount,deal_currency_code,closedate"], call.query
        deal = self.deals[match[1]]
        return Answer(200, {"id": match[1], "properties": {
            "amount": deal["amount"], "deal_currency_code": deal["deal_currency_code"],
            "closedate": deal["closedate"], "hs_object_id": match[1]},
            "archived": False})

    def contact(self, call, match):
        assert call.query["properties"] == ["email"], call.query
        if match[1] not in self.contacts:
            return Answer(404, {"status": "error", "category": "OBJECT_NOT_FOUND"})
        return Answer(200, {"id": match[1], "properties": dict(self.contacts[match[1]]),
                            "archived": False})

    def update_contact(self, call, match):
        properties = call.body["properties"]
        assert isinstance(properties, dict) and properties, call.body
        assert all(isinstance(v, str) for v in properties.values()), properties
        self.contacts[match[1]].update(properties)
        return Answer(200, {"id": match[1], "properties": self.contacts[match[1]]})

    def search_contacts(self, call, match):
        [group] = call.body["filterGroups"]
        [rule] = group["filters"]
        assert (rule["propertyName"], rule["operator"]) == ("email", "EQ"), rule
        found = [{"id": cid, "properties": c} for cid, c in self.contacts.items()
                 if c.get("email") == rule["value"]]
        return Answer(200, {"total": len(found), "results": found})

    def search_tasks(self, call, match):
        [group] = call.body["filterGroups"]
        [rule] = group["filters"]
        assert (rule["propertyName"], rule["operator"]) == ("retention_decision_id", "EQ")
        found = [t for t in self.tasks
                 if t["properties"]["retention_decision_id"] == rule["value"]]
        return Answer(200, {"total": len(found), "results": found})

    def create_task(self, call, match):
        properties = call.body["properties"]
        for name in ("hs_task_subject", "hs_task_body", "hs_timestamp",
                     "retention_decision_id"):
            assert isinstance(properties[name], str) and properties[name], name
        datetime.fromisoformat(properties["hs_timestamp"])  # a documented timestamp
        [association] = call.body["associations"]
        assert association["to"]["id"] in self.contacts, association
        assert association["types"] == [{"associationCategory": "HUBSPOT_DEFINED",
                                         "associationTypeId": 204}], association
        task = {"id": str(1000 + len(self.tasks)), "properties": properties,
                "contact": association["to"]["id"]}
        self.tasks.append(task)
        return Answer(201, task)


@pytest.fixture
def hubspot():
    platform = HubSpot()
    platform.api.start()
    yield platform
    platform.api.stop()
    assert platform.api.problems == []


def settings_of(hubspot: HubSpot | None = None, **more: str) -> dict[str, str]:
    values = {"hubspot.secret": SECRET, "hubspot.url": URL, "hubspot.token": TOKEN,
              "hubspot.api_url": hubspot.api.url if hubspot else "http://127.0.0.1:9"}
    return {**values, **{f"hubspot.{k}": v for k, v in more.items()}}


# -- the source ----------------------------------------------------------------------------

def test_an_email_property_change_links_the_contact_to_the_address(start, db):
    server = start(settings_of())
    creation = fixture("hubspot", "contact_creation.json")
    reply = server.post("/hooks/hubspot", raw=creation, headers=signed(creation))
    # contact.creation names no email: nothing to link yet
    assert (reply.status, reply.body["ignored"], reply.body["new"]) == (200, 1, 0)
    change = fixture("hubspot", "contact_email_change.json")
    reply = server.post("/hooks/hubspot", raw=change, headers=signed(change))
    assert (reply.status, reply.body["identified"]) == (200, 1)
    assert aliases(db) == {"hubspot:678": "email:bo.ling@example.org"}
    assert stored(db) == []


def test_a_won_deal_is_a_purchase_of_the_contact_the_associations_api_names(
        start, db, hubspot):
    server = start(settings_of(hubspot))
    body = fixture("hubspot", "deal_won.json")
    reply = server.post("/hooks/hubspot", raw=body, headers=signed(body))
    assert (reply.status, reply.body["new"], reply.body["identified"]) == (200, 1, 1)
    [purchase] = stored(db)
    assert purchase == {"id": "deal:9001", "customer": "email:bo.ling@example.org",
                        "type": "purchase", "at": "2019-07-27T04:00:00+00:00",
                        "source": "hubspot", "order_id": "9001", "amount": 1500.0,
                        "currency": "EUR"}
    assert aliases(db) == {"hubspot:678": "email:bo.ling@example.org"}
    api = hubspot.api
    assert [c.path for c in api.calls] == ["/crm/v4/objects/deals/9001/associations/contacts",
                                           "/crm/v3/objects/deals/9001",
                                           "/crm/v3/objects/contacts/678"]
    assert {c.headers["authorization"] for c in api.calls} == {f"Bearer {TOKEN}"}
    # HubSpot's retry of the same notification (another attempt number) counts once
    again = body.replace(b'"attemptNumber": 0', b'"attemptNumber": 1')
    reply = server.post("/hooks/hubspot", raw=again, headers=signed(again))
    assert (reply.status, reply.body["new"], reply.body["duplicates"]) == (200, 0, 1)
    assert count(db, "events") == 1


def test_a_stage_named_in_won_stages_is_won_too(start, db, hubspot):
    server = start(settings_of(hubspot, won_stages="contractsigned, paid"))
    body = fixture("hubspot", "deal_won.json").replace(b'"closedwon"', b'"paid"')
    reply = server.post("/hooks/hubspot", raw=body, headers=signed(body))
    assert (reply.status, reply.body["new"]) == (200, 1)
    assert [e["id"] for e in stored(db)] == ["deal:9001"]


def test_a_batch_maps_what_it_maps_and_ignores_the_rest(start, db, hubspot):
    server = start(settings_of(hubspot))
    body = fixture("hubspot", "batch.json")
    reply = server.post("/hooks/hubspot", raw=body, headers=signed(body))
    # a creation, a first name, a deal not won, a company: ignored; the email: linked
    assert reply.status == 200, reply.body
    assert (reply.body["identified"], reply.body["ignored"], reply.body["new"]) == (1, 4, 0)
    assert aliases(db) == {"hubspot:679": "email:ana@example.com"}
    assert hubspot.api.calls == []  # no deal was won: nothing to look up


def test_the_signed_uri_is_the_configured_url_percent_decoded_as_hubspot_does(start, db):
    url = "https://shop.example/retention/hooks/hubspot?portal%3D62515&key=a%40b%2Cc"
    server = start(settings_of(url=url))
    body = fixture("hubspot", "contact_email_change.json")
    reply = server.post("/hooks/hubspot", raw=body, headers=signed(body, url=url))
    assert (reply.status, reply.body["identified"]) == (200, 1)
    # signed over the URI as sent, without HubSpot's decoding: refused
    raw = {"X-HubSpot-Request-Timestamp": str(int(time.time() * 1000))}
    source = b"POST" + url.encode() + body + raw["X-HubSpot-Request-Timestamp"].encode()
    raw["X-HubSpot-Signature-v3"] = base64.b64encode(
        hmac.new(SECRET.encode(), source, hashlib.sha256).digest()).decode()
    assert server.post("/hooks/hubspot", raw=body, headers=raw).status == 401


@pytest.mark.parametrize("tamper", ["secret", "body", "url", "stale", "future", "missing",
                                    "no timestamp", "seconds"])
def test_a_wrong_or_stale_signature_is_401_and_nothing_is_stored(start, db, tamper):
    server = start(settings_of())
    body = fixture("hubspot", "contact_email_change.json")
    headers = {
        "secret": lambda: signed(body, secret="another secret"),
        "body": lambda: signed(body.replace(b"Bo.Ling", b"Eve")),
        "url": lambda: signed(body, url="http://retention.shop.example/hooks/hubspot"),
        "stale": lambda: signed(body, at=time.time() - 301),
        "future": lambda: signed(body, at=time.time() + 301),
        "missing": lambda: {k: v for k, v in signed(body).items()
                            if k != "X-HubSpot-Signature-v3"},
        "no timestamp": lambda: {k: v for k, v in signed(body).items()
                                 if k != "X-HubSpot-Request-Timestamp"},
        # a timestamp in seconds is more than five minutes away in milliseconds
        "seconds": lambda: {**signed(body), "X-HubSpot-Request-Timestamp":
                            str(int(time.time()))},
    }[tamper]()
    reply = server.post("/hooks/hubspot", raw=body, headers=headers)
    assert reply.status == 401, reply.body
    assert (count(db, "events"), count(db, "aliases"), count(db, "dead_letters")) == (0, 0, 0)


@pytest.mark.parametrize(("body", "reason"), [
    (b'{"subscriptionType": "contact.creation"}', "JSON array"),
    (b'[{"eventId": 1, "objectId": 678}]', "subscriptionType"),
    (b'[{"subscriptionType": "deal.propertyChange", "propertyName": "dealstage",'
     b' "propertyValue": "closedwon", "objectId": [1], "occurredAt": 1564200000000}]',
     "objectId"),
    (b"[1, 2]", "event 0 is int"),
    (b"[{", "invalid JSON"),
    # HubSpot sends at most 100: more would be up to 3 API calls each, replayed at will
    (json.dumps([{"subscriptionType": "contact.creation"}] * 101).encode(), "101 events"),
])
def test_a_body_that_is_not_hubspots_is_400_and_kept_as_a_dead_letter(start, db, body,
                                                                      reason):
    server = start(settings_of())
    reply = server.post("/hooks/hubspot", raw=body, headers=signed(body))
    assert reply.status == 400 and reason in reply.body["error"], reply.body
    [(why, raw, retriable)] = rows(db, "SELECT reason, raw, retriable FROM dead_letters")
    assert reason in why and raw == body.decode() and retriable == 0
    assert count(db, "events") == 0


# -- a lookup that fails: kept, retried ------------------------------------------------------

@pytest.mark.parametrize("failure", [(503, {}), (429, {"Retry-After": "30"}), (500, {})])
def test_a_failed_lookup_keeps_the_body_to_retry_and_a_retry_lands_the_purchase(
        start, db, hubspot, failure):
    server = start(settings_of(hubspot))
    body = fixture("hubspot", "deal_won.json")
    hubspot.api.script(*failure)
    reply = server.post("/hooks/hubspot", raw=body, headers=signed(body))
    # HubSpot is told to send it again, and the body is kept meanwhile
    assert reply.status == 503 and "kept to retry" in reply.body["error"], reply.body
    [(reason, raw, retriable, resend_to)] = rows(
        db, "SELECT reason, raw, retriable, resend_to FROM " + LETTERS)
    assert f"answered {failure[0]}" in reason and "deal 9001" in reason
    assert (raw, retriable, resend_to) == (body.decode().rstrip("\n"), 1, "hubspot")
    assert count(db, "events") == 0

    sets = [part for key, value in settings_of(hubspot).items()
            for part in ("--set", f"{key}={value}")]
    # HubSpot's API still down: the letter stays, with the new reason
    hubspot.api.script(503)
    result = CliRunner().invoke(cli, ["dead-letters", "--db", str(db), "--retry", *sets])
    assert result.exit_code == 2, result.output
    assert "still dead-lettered 1" in result.output
    assert rows(db, "SELECT retriable, resend_to FROM " + LETTERS) == [(1, "hubspot")]
    # back: the retry hands the body to the source again, and the purchase lands
    result = CliRunner().invoke(cli, ["dead-letters", "--db", str(db), "--retry", *sets])
    assert result.exit_code == 0, result.output
    assert "ingested 1" in result.output
    assert count(db, "dead_letters") == 0
    assert [(e["id"], e["customer"], e["source"]) for e in stored(db)] == [
        ("deal:9001", "email:bo.ling@example.org", "hubspot")]


def test_a_retry_without_the_token_keeps_the_letter(start, db, hubspot, monkeypatch):
    monkeypatch.delenv("RETENTION_HUBSPOT_TOKEN", raising=False)
    server = start(settings_of(hubspot))
    body = fixture("hubspot", "deal_won.json")
    hubspot.api.script(503)
    assert server.post("/hooks/hubspot", raw=body, headers=signed(body)).status == 503
    result = CliRunner().invoke(cli, ["dead-letters", "--db", str(db), "--retry",
                                      "--set", f"hubspot.secret={SECRET}",
                                      "--set", f"hubspot.url={URL}"])
    assert result.exit_code == 2, result.output
    [(reason, retriable)] = rows(db, "SELECT reason, retriable FROM dead_letters")
    assert "RETENTION_HUBSPOT_TOKEN" in reason and retriable == 1
    assert count(db, "events") == 0


# -- the sink --------------------------------------------------------------------------------

RULES = """\
capital: {initial: 70, min: 0, max: 100, opens_on: [purchase]}
rules:
  complaint:
    when: event.type == "complaint"
    points: -5
    then: [call_customer, flag_in_crm]
actions:
  call_customer: {kind: service, via: crm_task}
  flag_in_crm:   {kind: service, via: crm_tag}
"""


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def shop(tmp_path):
    """A database where ann (HubSpot contact 42 through her hubspot: id) and bob (an
    email only, which a search finds) each made a complaint: one crm_task and one
    crm_tag decision each."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    path = tmp_path / "crm.db"
    day = datetime.now(UTC) - timedelta(days=1)
    engine = StoredEngine(path, rules)
    engine.ingest([
        {"type": "identify", "customer": "email:ann@example.com", "aliases": ["hubspot:42"]},
        *({"id": f"{who}-{n}", "customer": f"email:{who}@example.com", "type": kind,
           "at": (day + timedelta(minutes=n)).isoformat()}
          for who in ("ann", "bob") for n, kind in enumerate(("purchase", "complaint")))])
    engine.close()
    return path, rules


def deliver(path, rules, hubspot, clock, **more):
    engine = StoredEngine(path, rules)
    try:
        deliverer = Deliverer(engine, plugins.sinks(), routes={"crm_task": "hubspot",
                                                               "crm_tag": "hubspot"},
                              settings=Settings(settings_of(hubspot, **more), environ={}),
                              clock=clock)
        return deliverer.run()
    finally:
        engine.close()


def statuses(path):
    return dict(rows(path, "SELECT via || ':' || customer, status FROM decisions"))


def test_crm_tag_sets_the_contact_property_and_crm_task_creates_one_task(shop, hubspot):
    path, rules = shop
    hubspot.contacts["77"] = {"email": "bob@example.com"}
    report = deliver(path, rules, hubspot, Clock())
    assert (report.sent, report.failed) == (4, 0), report.errors
    # ann through her hubspot: id, bob through a search by email
    assert hubspot.contacts["42"]["retention_level"] == "complaint"
    assert hubspot.contacts["77"]["retention_level"] == "complaint"
    assert sorted(t["contact"] for t in hubspot.tasks) == ["42", "77"]
    ids = {t["properties"]["retention_decision_id"] for t in hubspot.tasks}
    assert ids == {i for (i,) in rows(path, "SELECT id FROM decisions WHERE via = 'crm_task'")}
    assert all(t["properties"]["hs_task_subject"] == "Retention: call_customer (complaint)"
               for t in hubspot.tasks)
    assert len(hubspot.api.made("POST", "/crm/v3/objects/contacts/search")) == 2


def test_a_tag_property_of_the_shops_choosing(shop, hubspot):
    path, rules = shop
    hubspot.contacts["77"] = {"email": "bob@example.com"}
    deliver(path, rules, hubspot, Clock(), tag_property="churn_risk")
    assert hubspot.contacts["42"]["churn_risk"] == "complaint"
    assert "retention_level" not in hubspot.contacts["42"]


def test_a_task_already_created_is_found_and_not_created_again(shop, hubspot):
    path, rules = shop
    hubspot.contacts["77"] = {"email": "bob@example.com"}
    (ann_task,) = rows(path, "SELECT id FROM decisions WHERE via = 'crm_task' AND customer"
                             " = 'email:ann@example.com'")[0]
    # a try that created the task, then lost the answer
    hubspot.tasks.append({"id": "999", "contact": "42",
                          "properties": {"retention_decision_id": ann_task}})
    report = deliver(path, rules, hubspot, Clock())
    assert (report.sent, report.failed) == (4, 0), report.errors
    assert sorted(t["contact"] for t in hubspot.tasks) == ["42", "77"]
    assert len(hubspot.api.made("POST", "/crm/v3/objects/tasks")) == 1


def test_429_waits_as_asked_503_is_retried_and_each_decision_lands_once(shop, hubspot):
    path, rules = shop
    hubspot.contacts["77"] = {"email": "bob@example.com"}
    clock = Clock()
    hubspot.api.script(429, {"Retry-After": "120"})
    report = deliver(path, rules, hubspot, clock)
    # a 429 sets the sink aside for the run: its decisions wait
    assert report.sent == 0 and report.paused, report
    [(next_try,)] = rows(path, "SELECT next_try FROM decisions WHERE status = 'failed'")
    assert next_try >= clock.now + 120
    clock.now += 121
    hubspot.api.script(503)
    report = deliver(path, rules, hubspot, clock)
    assert report.failed == 1 and report.sent == 3, report
    clock.now += 3600
    report = deliver(path, rules, hubspot, clock)
    assert (report.sent, report.failed) == (1, 0), report
    assert set(statuses(path).values()) == {"sent"}
    assert len(hubspot.tasks) == 2
    assert len({t["properties"]["retention_decision_id"] for t in hubspot.tasks}) == 2


def test_a_contact_hubspot_does_not_know_fails_for_good(shop, hubspot):
    path, rules = shop  # bob's email is no HubSpot contact
    report = deliver(path, rules, hubspot, Clock())
    assert report.sent == 2 and report.failed == 2, report
    assert any("no HubSpot contact" in e for e in report.errors)
    assert rows(path, "SELECT DISTINCT status FROM decisions WHERE customer ="
                      " 'email:bob@example.com'") == [("failed",)]
    assert {r for (r,) in rows(path, "SELECT next_try FROM decisions WHERE customer ="
                                     " 'email:bob@example.com'")} == {None}


def test_a_refused_token_is_permanent(shop, hubspot):
    path, rules = shop
    engine = StoredEngine(path, rules)
    try:
        values = {**settings_of(hubspot), "hubspot.token": "pat-wrong"}
        report = Deliverer(engine, plugins.sinks(), routes={"crm_task": "hubspot",
                                                            "crm_tag": "hubspot"},
                           settings=Settings(values, environ={}), clock=Clock()).run()
    finally:
        engine.close()
    assert report.sent == 0 and any("401" in e for e in report.errors), report
    assert hubspot.tasks == []


def test_retention_deliver_routes_crm_task_and_crm_tag_to_hubspot(shop, hubspot):
    path, rules = shop
    hubspot.contacts["77"] = {"email": "bob@example.com"}
    sets = [part for key, value in settings_of(hubspot).items()
            for part in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(cli, ["deliver", "--db", str(path), "--rules", str(rules),
                                      "--route", "crm_task=hubspot",
                                      "--route", "crm_tag=hubspot", *sets])
    assert result.exit_code == 0, result.output
    assert re.search(r"sent 4\b", result.output), result.output
    assert len(hubspot.tasks) == 2


def test_check_stops_warning_once_crm_task_and_crm_tag_are_routed_to_a_loaded_sink(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    plain = CliRunner().invoke(cli, ["check", str(rules)])
    assert plain.exit_code == 0
    assert "via 'crm_tag'" in plain.output and "via 'crm_task'" in plain.output
    routed = CliRunner().invoke(cli, ["check", str(rules), "--route", "crm_task=hubspot",
                                      "--route", "crm_tag=hubspot"])
    assert routed.exit_code == 0 and "warning" not in routed.output, routed.output
    wrong = CliRunner().invoke(cli, ["check", str(rules), "--route", "crm_task=hubspt",
                                     "--route", "crm_tag=hubspot"])
    assert wrong.exit_code == 0
    assert "--route crm_task=hubspt" in wrong.output and "hubspot" in wrong.output
    assert "crm_tag" not in wrong.output.replace("--route crm_tag", "")


def test_the_plugin_lists_what_it_provides():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    [entry] = [p for p in json.loads(result.output) if p["name"] == "hubspot"]
    assert "sink hubspot" in entry["provides"] and "source hubspot" in entry["provides"]
