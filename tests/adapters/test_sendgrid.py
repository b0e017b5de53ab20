"""The sendgrid source: SendGrid's signed Event Webhook (ECDSA P-256 over the timestamp
and the body), its documented events on a real server, consent, and the verifier
checked against SendGrid's own Python library."""

from __future__ import annotations

import base64
import json
import time
from typing import Any
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from retention_adapters.sendgrid import SendGridSource
from sendgrid.helpers.eventwebhook import EventWebhook

from retention.delivery import Settings
from retention.signing import SignatureError

from .conftest import count, fixture, fixture_json, rows, stored

PRIVATE = ec.generate_private_key(ec.SECP256R1())
#: the verification key as SendGrid's settings page shows it: base64 of the DER key
PUBLIC = base64.b64encode(PRIVATE.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
ADDRESS = "email:example@test.com"


def signed(body: bytes, stamp: int | None = None, key: Any = PRIVATE) -> dict[str, str]:
    """SendGrid's headers: ECDSA-SHA256 of the timestamp then the body, base64 DER."""
    stamp = int(time.time()) if stamp is None else stamp
    signature = key.sign(str(stamp).encode() + body, ec.ECDSA(hashes.SHA256()))
    return {"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": str(stamp)}


@pytest.fixture
def sendgrid(start):
    return start({"sendgrid.public_key": PUBLIC})


def post(server: Any, events: Any) -> Any:
    body = events if isinstance(events, bytes) else json.dumps(events).encode()
    return server.post("/hooks/sendgrid", raw=body, headers=signed(body))


def event(kind: str, sg_id: str, day: int, email: str = "ann@example.com", **more: Any
          ) -> dict[str, Any]:
    """One event shaped like the documented ones (taken from the fixture's)."""
    [documented] = [e for e in fixture_json("sendgrid", "events.json") if e["event"] == kind
                    and (kind != "bounce" or e["type"] == more.get("type", "bounce"))]
    return {**documented, "email": email, "sg_event_id": sg_id,
            "timestamp": 1767225600 + day * 86400, **more}


def consent(server: Any, customer: str, day: int) -> bool:
    at = f"2026-01-{day + 1:02d}T12:00:00Z"
    reply = server.get(f"/customers/{quote(customer, safe='')}?at={at}")
    assert reply.status == 200, reply.body
    return reply.body["consent"]


def test_the_documented_events_become_canonical_events(sendgrid, db):
    body = fixture("sendgrid", "events.json")
    reply = sendgrid.post("/hooks/sendgrid", raw=body, headers=signed(body))
    assert reply.status == 200, reply.body
    assert (reply.body["new"], reply.body["ignored"]) == (13, 2)  # processed, deferred
    got = {e["id"]: e for e in stored(db, "sendgrid")}
    assert {e["customer"] for e in got.values()} == {ADDRESS}
    assert {e["at"] for e in got.values()} == {"2017-12-15T00:59:29+00:00"}
    assert {k: (e["type"], e.get("hard"), e.get("list")) for k, e in got.items()} == {
        "sg:rWVYmVk90MjZJ9iohOBa3w==": ("email_delivered", None, None),
        "sg:FOTFFO0ecsBE-zxFXfs6WA==": ("email_open", None, None),
        "sg:kCAi1KttyQdEKHhdC-nuEA==": ("email_click", None, None),
        "sg:6g4ZI7SA-xmRDv57GoPIPw==": ("email_bounce", True, None),
        "sg:6g4ZI7SA-xmRDv57GoPIPw==:unsubscribe": ("unsubscribe", None, None),
        "sg:Tmh3Ojp3nB3hAYMgdoeYfg==": ("email_bounce", False, None),  # type: blocked
        "sg:zmzJhfJgAfUSOW80yEbPyw==": ("email_bounce", True, None),  # Bounced Address
        "sg:zmzJhfJgAfUSOW80yEbPyw==:unsubscribe": ("unsubscribe", None, None),
        "sg:37nvH5QBz858KGVYCM4uOA==": ("spam_report", None, None),
        "sg:37nvH5QBz858KGVYCM4uOA==:unsubscribe": ("unsubscribe", None, None),
        "sg:zz_BjPgU_5pS-J8vlfB1sg==": ("unsubscribe", None, None),
        "sg:ahSCB7xYcXFb-hEaawsPRw==": ("unsubscribe", None, "10"),
        "sg:w_u0vJhLT-OFfprar5N93g==": ("subscribe", None, "10")}
    assert got["sg:kCAi1KttyQdEKHhdC-nuEA=="]["url"] == "http://www.sendgrid.com/"
    assert got["sg:kCAi1KttyQdEKHhdC-nuEA=="]["campaign"] == "cat facts"
    assert got["sg:zmzJhfJgAfUSOW80yEbPyw=="]["dropped"] is True
    assert got["sg:37nvH5QBz858KGVYCM4uOA==:unsubscribe"]["reason"] == "spam report"
    assert got["sg:6g4ZI7SA-xmRDv57GoPIPw==:unsubscribe"]["reason"] == "hard bounce"
    # SendGrid retries a batch it got no 2xx for: the same facts count once
    again = sendgrid.post("/hooks/sendgrid", raw=body, headers=signed(body))
    assert (again.status, again.body["new"], again.body["duplicates"]) == (200, 0, 13)
    assert count(db, "events") == 13


@pytest.mark.parametrize(("withdrawing", "more"), [
    ("spamreport", {}), ("unsubscribe", {}), ("group_unsubscribe", {}),
    ("bounce", {"type": "bounce"}), ("dropped", {"reason": "Invalid"})])
def test_what_withdraws_consent_withdraws_it_and_a_resubscribe_gives_it_back(
        sendgrid, withdrawing, more):
    assert post(sendgrid, [event("open", "o1", 1)]).status == 200
    assert consent(sendgrid, "email:ann@example.com", 1) is True
    assert post(sendgrid, [event(withdrawing, "w1", 2, **more)]).status == 200
    assert consent(sendgrid, "email:ann@example.com", 2) is False
    assert post(sendgrid, [event("group_resubscribe", "r1", 3)]).status == 200
    assert consent(sendgrid, "email:ann@example.com", 3) is True


@pytest.mark.parametrize(("kind", "more"), [("bounce", {"type": "blocked"}),
                                            ("dropped", {"reason": "Spam Content"}),
                                            ("delivered", {}), ("click", {})])
def test_a_soft_bounce_or_an_engagement_leaves_consent_alone(sendgrid, kind, more):
    assert post(sendgrid, [event("open", "o1", 1), event(kind, "x1", 2, **more)]
                ).status == 200
    assert consent(sendgrid, "email:ann@example.com", 2) is True


def test_the_address_is_lower_cased_and_one_that_is_none_is_ignored(sendgrid, db):
    reply = post(sendgrid, [event("open", "o1", 1, email="Ann@Example.COM"),
                            event("dropped", "d1", 1, email="not an email address",
                                  reason="Invalid")])
    assert (reply.status, reply.body["new"], reply.body["ignored"]) == (200, 1, 1)
    assert [e["customer"] for e in stored(db)] == ["email:ann@example.com"]


@pytest.mark.parametrize("tamper", ["body", "stamp", "signature", "key"])
def test_a_wrong_signature_is_401_and_stores_nothing(sendgrid, db, tamper):
    body = json.dumps([event("open", "o1", 1)]).encode()
    stamp = int(time.time())
    headers = signed(body, stamp, ec.generate_private_key(ec.SECP256R1())
                     if tamper == "key" else PRIVATE)
    if tamper == "body":
        body = body.replace(b"ann@", b"eve@")
    elif tamper == "stamp":
        headers["X-Twilio-Email-Event-Webhook-Timestamp"] = str(stamp + 1)
    elif tamper == "signature":
        headers["X-Twilio-Email-Event-Webhook-Signature"] = "not base64!"
    reply = sendgrid.post("/hooks/sendgrid", raw=body, headers=headers)
    assert reply.status == 401, reply.body
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0


@pytest.mark.parametrize("missing", ["X-Twilio-Email-Event-Webhook-Signature",
                                     "X-Twilio-Email-Event-Webhook-Timestamp"])
def test_a_missing_header_is_401(sendgrid, db, missing):
    body = json.dumps([event("open", "o1", 1)]).encode()
    headers = signed(body)
    del headers[missing]
    reply = sendgrid.post("/hooks/sendgrid", raw=body, headers=headers)
    assert reply.status == 401 and missing in reply.body["error"], reply.body
    assert count(db, "events") == 0


@pytest.mark.parametrize("offset", [-301, 301])
def test_a_timestamp_more_than_five_minutes_away_is_refused(sendgrid, db, offset):
    body = json.dumps([event("open", "o1", 1)]).encode()
    reply = sendgrid.post("/hooks/sendgrid", raw=body,
                          headers=signed(body, int(time.time()) + offset))
    assert reply.status == 401, reply.body
    assert "5 minutes" in reply.body["error"]
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0


@pytest.mark.parametrize(("events", "reason"), [
    ({"event": "open"}, "not a JSON array"),
    (["open"], "event 1 is str"),
    ([{"event": "open", "email": "ann@example.com", "timestamp": 1767225600}],
     "no sg_event_id"),
    ([{"event": "click", "email": "ann@example.com", "sg_event_id": "c1",
       "timestamp": "yesterday"}], "timestamp is str"),
    ([{"event": "group_unsubscribe", "email": "ann@example.com", "sg_event_id": "g1",
       "timestamp": 1767225600}], "no asm_group_id")])
def test_a_body_that_is_not_sendgrids_is_400_and_a_dead_letter(sendgrid, db, events, reason):
    body = json.dumps(events).encode()
    reply = post(sendgrid, body)
    assert reply.status == 400, reply.body
    assert reason in reply.body["error"]
    assert rows(db, "SELECT origin, reason, raw FROM dead_letters") == [
        ("POST /hooks/sendgrid", reply.body["error"], body.decode())]
    assert count(db, "events") == 0


def test_the_key_may_be_pem_and_a_wrong_one_is_a_setting_error(start, db):
    pem = PRIVATE.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    server = start({"sendgrid.public_key": pem})
    assert post(server, [event("open", "o1", 1)]).status == 200
    other = start({"sendgrid.public_key": "bm90IGEga2V5"})
    reply = post(other, [event("open", "o2", 1)])
    assert reply.status == 503 and "verification key" in reply.body["error"], reply.body


def test_the_verifier_agrees_with_sendgrids_own_library():
    """SendGrid's Python library (sendgrid.helpers.eventwebhook) and this adapter accept
    the same signed body and both refuse it tampered."""
    body = fixture("sendgrid", "events.json")
    headers = {k.lower(): v for k, v in signed(body).items()}
    signature = headers["x-twilio-email-event-webhook-signature"]
    stamp = headers["x-twilio-email-event-webhook-timestamp"]
    official = EventWebhook()
    key = official.convert_public_key_to_ecdsa(PUBLIC)
    source = SendGridSource(Settings({"sendgrid.public_key": PUBLIC}, environ={}))

    assert official.verify_signature(body.decode(), signature, stamp, key) is True
    source.verify(body, headers)  # accepted: no exception

    tampered = body.replace(b"example@test.com", b"example@test.org", 1)
    assert official.verify_signature(tampered.decode(), signature, stamp, key) is False
    with pytest.raises(SignatureError, match="wrong"):
        source.verify(tampered, headers)
