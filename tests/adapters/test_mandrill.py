"""The mandrill source: Mandrill's form-encoded ``mandrill_events`` signed with
HMAC-SHA1 of the webhook URL and the POST fields, its URL checks (HEAD, and an empty
batch signed with the key ``test-webhook``), its documented events on a real server,
and consent."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import quote, urlencode

import pytest

from tests.test_server import request

from .conftest import count, fixture, fixture_json, rows, stored

KEY = "Ab3dEfGh1jKlMnOpQrStUv"
#: the Post To URL as entered in Mandrill: the public address, not the loopback one
URL = "https://retention.shop.example/hooks/mandrill?shop=eu"
SETTINGS = {"mandrill.key": KEY, "mandrill.url": URL}
ADDRESS = "email:example.webhook@mandrillapp.com"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def signature(fields: dict[str, str], key: str = KEY, url: str = URL) -> str:
    """Mandrill's algorithm: the URL, then each field's name and value, names sorted,
    HMAC-SHA1 with the webhook key, base64."""
    signed = url + "".join(name + fields[name] for name in sorted(fields))
    return base64.b64encode(hmac.new(key.encode(), signed.encode(), hashlib.sha1).digest()
                            ).decode()


def form(events: Any) -> dict[str, str]:
    return {"mandrill_events": events if isinstance(events, str) else json.dumps(events)}


def post(server: Any, fields: dict[str, str], key: str = KEY, url: str = URL,
         sign: str | None = None) -> Any:
    headers = {**FORM, "X-Mandrill-Signature": sign or signature(fields, key, url)}
    return server.post("/hooks/mandrill", raw=urlencode(fields).encode(), headers=headers)


@pytest.fixture
def mandrill(start):
    return start(SETTINGS)


def documented(kind: str, ts: int, email: str = "ann@example.com", **more: Any
               ) -> dict[str, Any]:
    """One of the fixture's events for another address and time."""
    [event] = [e for e in fixture_json("mandrill", "events.json") if e.get("event") == kind]
    return {**event, "msg": {**event["msg"], "email": email}, "ts": ts, **more}


def consent(server: Any, customer: str, at: str) -> bool:
    reply = server.get(f"/customers/{quote(customer, safe='')}?at={at}")
    assert reply.status == 200, reply.body
    return reply.body["consent"]


def test_the_documented_events_become_canonical_events(mandrill, db):
    fields = form(fixture("mandrill", "events.json").decode())
    reply = post(mandrill, fields)
    assert reply.status == 200, reply.body
    # deferral, reject and the blacklist sync event are ignored
    assert (reply.body["new"], reply.body["ignored"]) == (9, 3)
    got = {e["id"]: e for e in stored(db, "mandrill")}
    assert {e["customer"] for e in got.values()} == {ADDRESS}
    assert {e["at"] for e in got.values()} == {"2013-11-20T13:26:44+00:00"}
    suffix = ":1384954004"
    assert {k: (e["type"], e.get("hard")) for k, e in got.items()} == {
        "mandrill:send:exampleaaaaaaaaaaaaaaaaaaaaaaaaa" + suffix: ("email_delivered", None),
        "mandrill:hard_bounce:exampleaaaaaaaaaaaaaaaaaaaaaaaaa2" + suffix: ("email_bounce", True),
        "mandrill:hard_bounce:exampleaaaaaaaaaaaaaaaaaaaaaaaaa2" + suffix + ":unsubscribe":
            ("unsubscribe", None),
        "mandrill:soft_bounce:exampleaaaaaaaaaaaaaaaaaaaaaaaaa3" + suffix: ("email_bounce", False),
        "mandrill:open:exampleaaaaaaaaaaaaaaaaaaaaaaaaa4" + suffix: ("email_open", None),
        "mandrill:click:exampleaaaaaaaaaaaaaaaaaaaaaaaaa5" + suffix: ("email_click", None),
        "mandrill:spam:exampleaaaaaaaaaaaaaaaaaaaaaaaaa6" + suffix: ("spam_report", None),
        "mandrill:spam:exampleaaaaaaaaaaaaaaaaaaaaaaaaa6" + suffix + ":unsubscribe":
            ("unsubscribe", None),
        "mandrill:unsub:exampleaaaaaaaaaaaaaaaaaaaaaaaaa7" + suffix: ("unsubscribe", None)}
    click = got["mandrill:click:exampleaaaaaaaaaaaaaaaaaaaaaaaaa5" + suffix]
    assert (click["url"], click["campaign"]) == ("http://mandrill.com", "webhook-example")
    bounce = got["mandrill:hard_bounce:exampleaaaaaaaaaaaaaaaaaaaaaaaaa2" + suffix]
    assert bounce["reason"] == "bad_mailbox"
    # Mandrill retries a batch it got no 2xx for: the same facts count once
    again = post(mandrill, fields)
    assert (again.status, again.body["new"], again.body["duplicates"]) == (200, 0, 9)


def test_each_open_of_a_message_is_an_event_of_its_own(mandrill, db):
    reply = post(mandrill, form([documented("open", 1767229200),
                                 documented("open", 1767232800)]))
    assert (reply.status, reply.body["new"]) == (200, 2), reply.body
    assert [e["type"] for e in stored(db)] == ["email_open", "email_open"]


@pytest.mark.parametrize("withdrawing", ["hard_bounce", "spam", "unsub"])
def test_what_withdraws_consent_withdraws_it(mandrill, withdrawing):
    assert post(mandrill, form([documented("open", 1767312000)])).status == 200
    assert consent(mandrill, "email:ann@example.com", "2026-01-02T12:00:00Z") is True
    assert post(mandrill, form([documented(withdrawing, 1767398400)])).status == 200
    assert consent(mandrill, "email:ann@example.com", "2026-01-03T12:00:00Z") is False
    # Mandrill sends no resubscribe: one from another source gives consent back
    subscribe = {"id": "s1", "customer": "email:ann@example.com", "type": "subscribe",
                 "at": "2026-01-04T00:00:00Z"}
    assert mandrill.post("/events", subscribe).status == 200
    assert consent(mandrill, "email:ann@example.com", "2026-01-04T12:00:00Z") is True


def test_a_soft_bounce_leaves_consent_alone(mandrill):
    assert post(mandrill, form([documented("open", 1767312000),
                                documented("soft_bounce", 1767398400)])).status == 200
    assert consent(mandrill, "email:ann@example.com", "2026-01-03T12:00:00Z") is True


def test_mandrills_checks_of_a_new_url_are_answered_200_and_store_nothing(mandrill, db):
    # the unsigned HEAD first
    assert request(mandrill.port, "HEAD", "/hooks/mandrill").status == 200
    # then, should that fail, an empty batch signed with the key "test-webhook"
    reply = post(mandrill, form("[]"), key="test-webhook")
    assert (reply.status, reply.body["new"], reply.body["ignored"]) == (200, 0, 1)
    assert post(mandrill, form("[]")).status == 200  # (signed with the webhook's key too)
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0
    # that key signs nothing else
    forged = post(mandrill, form([documented("unsub", 1767398400)]), key="test-webhook")
    assert forged.status == 401, forged.body
    assert count(db, "events") == 0


@pytest.mark.parametrize("tamper", ["body", "key", "url", "missing", "field"])
def test_a_wrong_signature_is_401_and_stores_nothing(mandrill, db, tamper):
    fields = form([documented("unsub", 1767398400)])
    if tamper == "body":
        sign = signature(fields)
        fields = form([documented("unsub", 1767398400, email="eve@example.com")])
        reply = post(mandrill, fields, sign=sign)
    elif tamper == "key":
        reply = post(mandrill, fields, key="another key")
    elif tamper == "url":  # a trailing slash is another URL
        reply = post(mandrill, fields, url=URL.replace("?", "/?"))
    elif tamper == "field":  # a field the signature did not cover
        sign = signature(fields)
        reply = post(mandrill, {**fields, "extra": "1"}, sign=sign)
    else:
        reply = mandrill.post("/hooks/mandrill", raw=urlencode(fields).encode(), headers=FORM)
    assert reply.status == 401, reply.body
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0


@pytest.mark.parametrize(("fields", "reason"), [
    ({"mandrill_events": "[{"}, "invalid JSON"),
    ({"mandrill_events": '{"event": "open"}'}, "not a JSON array"),
    ({"events": "[]"}, "no mandrill_events"),
    (form([{"event": "open", "_id": "m1", "ts": 1767398400}]), "no msg"),
    (form([{"event": "open", "_id": "m1", "ts": "today", "msg": {"email": "a@b.c"}}]),
     "ts is str")])
def test_a_body_that_is_not_mandrills_is_400_and_a_dead_letter(mandrill, db, fields, reason):
    reply = post(mandrill, fields)
    assert reply.status == 400, reply.body
    assert reason in reply.body["error"]
    assert rows(db, "SELECT origin, reason FROM dead_letters") == [
        ("POST /hooks/mandrill", reply.body["error"])]
    assert count(db, "events") == 0
