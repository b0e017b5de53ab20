"""One person through three platforms, on a real server: an order on Shopify, an email
opened through SendGrid, a Zendesk ticket solved two days later. All of it lands on
one customer, the resolution recovers the complaint, and the task the complaint
decided reaches Zendesk's API (on loopback) exactly once, though the first try
answers 503. Each platform's signature is computed here, as the platform documents
it, and the payloads are the documented examples of tests/fixtures/."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from retention import plugins
from retention.delivery import Deliverer, Settings
from retention.server import create_app
from retention.store import StoredEngine

from ..test_server import config_of, serving
from .conftest import aliases, fixture_json, rows
from .test_zendesk import AGENT, TOKEN, Zendesk

RULES = """\
capital: {initial: 70, min: 0, max: 100, opens_on: [purchase]}
rules:
  complaint:
    when: event.type == "complaint"
    points: -12
    category: incident
    then: [call_customer]
  complaint_resolved:
    when: event.type == "ticket_resolved"
    recovers: complaint
    match: ticket_id
    within: 7d
    refund: 1.0
    bonus: 3
    category: recovery
  opened_an_email:
    when: event.type == "email_open"
    points: 1
    category: contribution
actions:
  call_customer: {kind: service, via: crm_task}
"""

SHOPIFY_SECRET = "shpss_the-apps-client-secret"
ZENDESK_SECRET = "the webhook signing secret"
SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())
ANN = "email:ann@example.com"
NOW = datetime.now(UTC).replace(microsecond=0)


def day(n: float) -> str:
    """n days from now (negative: ago), as platforms write times."""
    return (NOW + timedelta(days=n)).strftime("%Y-%m-%dT%H:%M:%SZ")


def shopify(body: bytes, topic: str) -> dict[str, str]:
    digest = hmac.new(SHOPIFY_SECRET.encode(), body, hashlib.sha256).digest()
    return {"X-Shopify-Topic": topic, "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
            "X-Shopify-Shop-Domain": "shop.myshopify.com"}


def sendgrid(body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    signature = SENDGRID_KEY.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp}


def zendesk(body: bytes) -> dict[str, str]:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    digest = hmac.new(ZENDESK_SECRET.encode(), stamp.encode() + body, hashlib.sha256).digest()
    return {"X-Zendesk-Webhook-Signature": base64.b64encode(digest).decode(),
            "X-Zendesk-Webhook-Signature-Timestamp": stamp}


def order() -> dict:
    payload = fixture_json("shopify", "orders_create.json")
    payload["email"] = "Ann@Example.com"
    payload["customer"]["email"] = "ann@example.com"
    payload["created_at"] = payload["processed_at"] = day(-10)
    return payload


def email_open() -> list[dict]:
    [documented] = [e for e in fixture_json("sendgrid", "events.json") if e["event"] == "open"]
    return [{**documented, "email": "ANN@example.com", "sg_event_id": "sg-open-1",
             "timestamp": int((NOW - timedelta(days=5)).timestamp())}]


def zendesk_event(name: str, at: str, **detail) -> dict:
    payload = copy.deepcopy(fixture_json("zendesk", name))
    payload["time"] = at
    payload["detail"].update(detail)
    return payload


@pytest.fixture
def world(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES, encoding="utf-8")
    path = tmp_path / "shop.db"
    StoredEngine(path, rules).close()
    public = base64.b64encode(SENDGRID_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    settings = {"shopify.secret": SHOPIFY_SECRET, "sendgrid.public_key": public,
                "zendesk.secret": ZENDESK_SECRET}
    with serving(create_app(config_of(path, settings))) as server:
        yield server, path, rules


def post(server, name: str, payload, headers) -> dict:
    body = json.dumps(payload).encode()
    reply = server.post(f"/hooks/{name}", raw=body, headers=headers(body))
    assert reply.status == 200, reply.body
    return reply.body


def test_a_shopify_buyer_who_opens_a_sendgrid_email_and_opens_a_zendesk_ticket(world):
    server, path, rules = world
    body = json.dumps(order()).encode()
    assert post(server, "shopify", order(), lambda b: shopify(b, "orders/create"))["new"] == 1
    assert post(server, "sendgrid", email_open(), sendgrid)["new"] == 1
    # Zendesk names the requester by id; its user event links the id to the address
    user = zendesk_event("user_created.json", day(-3.5), email="ann@example.com",
                         id="91011")
    post(server, "zendesk", user, zendesk)
    opened = zendesk_event("ticket_created.json", day(-3), requester_id="91011",
                           id="35436", created_at=day(-3))
    assert post(server, "zendesk", opened, zendesk)["new"] == 1
    solved = zendesk_event("ticket_solved.json", day(-1), requester_id="91011", id="35436")
    assert post(server, "zendesk", solved, zendesk)["new"] == 1
    # a platform's retry counts once
    again = server.post("/hooks/shopify", raw=body, headers=shopify(body, "orders/paid"))
    assert (again.status, again.body["new"], again.body["duplicates"]) == (200, 0, 1)

    # one customer, known by each platform's id
    assert {a: c for a, c in aliases(path).items() if not a.startswith("shopify-order:")} == {
        "shopify:115310627314723954": ANN, "zendesk:91011": ANN}
    assert rows(path, "SELECT DISTINCT customer FROM events") == [(ANN,)]
    assert [t for (t,) in rows(path, "SELECT type FROM events ORDER BY at")] == [
        "purchase", "email_open", "complaint", "ticket_resolved"]
    # the resolution gave the complaint back, with its bonus: 70 + 1 - 12 + 12 + 3
    customer = server.get(f"/customers/{quote(ANN, safe='')}").body
    assert customer["capital"] == pytest.approx(74)
    assert [(e["rule"], e["points"]) for e in customer["ledger"]] == [
        ("opening", 70), ("opened_an_email", 1), ("complaint", -12),
        ("complaint_resolved", 12), ("complaint_resolved", 3)]

    # the complaint's task reaches Zendesk once: the first try answers 503
    [(decision, status)] = rows(path, "SELECT id, status FROM decisions WHERE via = 'crm_task'")
    assert status == "pending"
    desk = Zendesk()
    desk.api.start()
    try:
        desk.api.script(503)
        clock = [time.time()]
        for _ in range(2):
            engine = StoredEngine(path, rules)
            try:
                Deliverer(engine, plugins.sinks(), routes={"crm_task": "zendesk"},
                          settings=Settings({"zendesk.api_url": desk.api.url,
                                             "zendesk.email": AGENT, "zendesk.token": TOKEN},
                                            environ={}),
                          clock=lambda: clock[0]).run()
            finally:
                engine.close()
            clock[0] += 3600  # past the backoff
        assert desk.api.problems == []
        assert [t["external_id"] for t in desk.tickets] == [decision]
        assert desk.tickets[0]["requester"]["email"] == "ann@example.com"
        assert rows(path, "SELECT status FROM decisions WHERE id = ?", decision) == [("sent",)]
        # the 503 answered the first request (the lookup), the ticket came on the retry
        assert desk.api.calls[0].status == 503
        assert [c.status for c in desk.api.calls if c.method == "POST"] == [201]
    finally:
        desk.api.stop()
