"""The postmark source: HTTP basic auth from the webhook URL (Postmark signs nothing),
its documented records on a real server, one unsubscribe for a suppression however
many records tell of it, and consent."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

import pytest

from .conftest import count, fixture, fixture_json, rows, stored

USER, PASSWORD = "postmark", "s3cret:with-colon"


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    """What an HTTP client sends for https://USER:PASSWORD@host/... (RFC 7617)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()
                                                         ).decode()}


@pytest.fixture
def postmark(start):
    return start({"postmark.username": USER, "postmark.password": PASSWORD})


def post(server: Any, record: Any, headers: dict[str, str] | None = None) -> Any:
    body = record if isinstance(record, bytes) else json.dumps(record).encode()
    return server.post("/hooks/postmark", raw=body,
                       headers=basic() if headers is None else headers)


def consent(server: Any, customer: str, at: str) -> bool:
    reply = server.get(f"/customers/{quote(customer, safe='')}?at={at}")
    assert reply.status == 200, reply.body
    return reply.body["consent"]


JOHN = "email:john@example.com"
MESSAGE = "00000000-0000-0000-0000-000000000000"


@pytest.mark.parametrize(("name", "expected"), [
    ("delivery.json", [(f"pm:delivery:{MESSAGE}:john@example.com", "email_delivered",
                        "2019-11-05T16:33:54.907025+00:00", {"campaign": "welcome-email"})]),
    ("bounce.json", [
        ("pm:bounce:4323372036854775807", "email_bounce", "2019-11-05T16:33:54.907025+00:00",
         {"hard": True, "bounce_type": "HardBounce", "campaign": "Test"}),
        ("pm:unsubscribe:883953f4-6105-42a2-a16a-77a8eac79483:john@example.com:HardBounce",
         "unsubscribe", "2019-11-05T16:33:54.907025+00:00", {"reason": "hard bounce"})]),
    ("soft-bounce.json", [("pm:bounce:4323372036854775808", "email_bounce",
                           "2019-11-05T16:34:54.907025+00:00",
                           {"hard": False, "bounce_type": "SoftBounce"})]),
    ("spam-complaint.json", [
        ("pm:spam:42", "spam_report", "2019-11-05T16:33:54.907025+00:00", {}),
        (f"pm:unsubscribe:{MESSAGE}:john@example.com:SpamComplaint", "unsubscribe",
         "2019-11-05T16:33:54.907025+00:00", {"reason": "spam report"})]),
    ("open.json", [(f"pm:open:{MESSAGE}:john@example.com:2019-11-05T16:33:54.9070259Z",
                    "email_open", "2019-11-05T16:33:54.907025+00:00", {"first_open": True})]),
    ("click.json", [(f"pm:click:{MESSAGE}:john@example.com:2017-10-25T15:21:11.0000000Z",
                     "email_click", "2017-10-25T15:21:11+00:00",
                     {"url": "https://example.com"})]),
    ("subscription-change.json", [
        ("pm:unsubscribe:883953f4-6105-42a2-a16a-77a8eac79483:bounced-address@wildbit.com:"
         "HardBounce", "unsubscribe", "2020-02-01T10:53:34.416071+00:00",
         {"list": "outbound", "reason": "HardBounce"})])])
def test_each_documented_record_becomes_its_events(postmark, db, name, expected):
    body = fixture("postmark", name)
    reply = post(postmark, body)
    assert reply.status == 200, reply.body
    assert reply.body["new"] == len(expected)
    got = {e["id"]: e for e in stored(db, "postmark")}
    assert sorted(got) == sorted(eid for eid, *_ in expected)
    for eid, kind, at, props in expected:
        event = got[eid]
        assert (event["type"], event["at"]) == (kind, at)
        assert event["customer"] == ("email:bounced-address@wildbit.com"
                                     if "wildbit" in eid else JOHN)
        assert {k: event.get(k) for k in props} == props
    # Postmark retries what got no 2xx: the same facts count once
    again = post(postmark, body)
    assert (again.body["new"], again.body["duplicates"]) == (0, len(expected))


def test_a_bounce_and_the_suppression_it_causes_unsubscribe_once(postmark, db):
    assert post(postmark, fixture("postmark", "bounce.json")).body["new"] == 2
    change = {**fixture_json("postmark", "subscription-change.json"),
              "Recipient": "John@Example.com"}  # the bounce's message and address
    reply = post(postmark, change)
    assert (reply.status, reply.body["new"], reply.body["duplicates"]) == (200, 0, 1)
    assert [e["type"] for e in stored(db)] == ["email_bounce", "unsubscribe"]


def record(name: str, at: str, **more: Any) -> dict[str, Any]:
    """A fixture's record for ann@example.com at another time."""
    documented = fixture_json("postmark", name)
    for key in ("DeliveredAt", "BouncedAt", "ReceivedAt", "ChangedAt"):
        if key in documented:
            documented[key] = at
    for key in ("Email", "Recipient"):
        if key in documented:
            documented[key] = "ann@example.com"
    return {**documented, **more}


@pytest.mark.parametrize(("name", "more"), [
    ("bounce.json", {}), ("bounce.json", {"Type": "BadEmailAddress", "ID": 7}),
    ("spam-complaint.json", {}), ("subscription-change.json",
                                  {"SuppressionReason": "ManualSuppression"}),
    ("subscription-change.json", {"MessageID": None, "Origin": "Customer"})])
def test_what_withdraws_consent_withdraws_it_and_a_reactivation_gives_it_back(
        postmark, name, more):
    ann = "email:ann@example.com"
    assert post(postmark, record("open.json", "2026-01-01T10:00:00Z")).status == 200
    assert consent(postmark, ann, "2026-01-01T12:00:00Z") is True
    reply = post(postmark, record(name, "2026-01-02T10:00:00Z", **more))
    assert reply.status == 200, reply.body
    assert consent(postmark, ann, "2026-01-02T12:00:00Z") is False
    back = record("subscription-change.json", "2026-01-03T10:00:00Z", SuppressSending=False,
                  MessageID=None, Origin="Customer")
    assert post(postmark, back).status == 200
    assert consent(postmark, ann, "2026-01-03T12:00:00Z") is True


@pytest.mark.parametrize("kind", ["SoftBounce", "Transient", "DnsError", "AutoResponder",
                                  "Blocked"])
def test_a_bounce_that_is_not_hard_leaves_consent_alone(postmark, db, kind):
    assert post(postmark, record("open.json", "2026-01-01T10:00:00Z")).status == 200
    assert post(postmark, record("soft-bounce.json", "2026-01-02T10:00:00Z", Type=kind)
                ).body["new"] == 1
    assert consent(postmark, "email:ann@example.com", "2026-01-02T12:00:00Z") is True


def test_a_record_type_not_mapped_is_ignored(postmark, db):
    reply = post(postmark, {"RecordType": "Inbound", "MessageID": "x"})
    assert (reply.status, reply.body["new"], reply.body["ignored"]) == (200, 0, 1)
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0


@pytest.mark.parametrize("headers", [
    {}, basic(password="guess"), basic(user="someone"), basic(password=PASSWORD + "x"),
    {"Authorization": "Bearer " + PASSWORD}, {"Authorization": "Basic not-base64!"},
    {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()}],
    ids=["missing", "wrong-password", "wrong-user", "longer-password", "bearer",
         "not-base64", "no-colon"])
def test_missing_or_wrong_credentials_are_401_and_store_nothing(postmark, db, headers):
    reply = post(postmark, fixture("postmark", "spam-complaint.json"), headers)
    assert reply.status == 401, reply.body
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0


@pytest.mark.parametrize(("body", "reason"), [
    (b"[1, 2]", "not a JSON object"),
    (b'{"ID": 42}', "no RecordType"),
    (json.dumps({**fixture_json("postmark", "bounce.json"), "ID": None}).encode(), "no ID"),
    (json.dumps({**fixture_json("postmark", "delivery.json"),
                 "Recipient": "john@example.com\r\nBcc: eve@example.com"}).encode(),
     "Recipient is not an address"),
    (json.dumps({**fixture_json("postmark", "open.json"),
                 "ReceivedAt": "2019-11-05T16:33:54"}).encode(), "no time zone"),
    (json.dumps({**fixture_json("postmark", "subscription-change.json"),
                 "SuppressSending": "yes"}).encode(), "SuppressSending is str")])
def test_a_body_that_is_not_postmarks_is_400_and_a_dead_letter(postmark, db, body, reason):
    reply = post(postmark, body)
    assert reply.status == 400, reply.body
    assert reason in reply.body["error"]
    assert rows(db, "SELECT origin, reason, raw FROM dead_letters") == [
        ("POST /hooks/postmark", reply.body["error"], body.decode())]
    assert count(db, "events") == 0
