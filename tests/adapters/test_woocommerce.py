"""The woocommerce source on a real server: WooCommerce's documented order and customer
bodies (tests/fixtures/woocommerce/, as the REST API v3 writes them, which is what its
webhooks send), signed here as WC_Webhook::generate_signature does (the base64 of the
HMAC-SHA256 of the raw body with the webhook's secret), and its unsigned ping."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest

from .conftest import aliases, count, fixture, fixture_json, rows, stored

SECRET = "wc-webhook-secret-0f9e8d"
BUYER = "email:john.doe@example.com"


def woo_headers(body: bytes, topic: str, secret: str = SECRET) -> dict[str, str]:
    """The headers WC_Webhook::deliver() sends, the signature computed here."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    resource, _, event = topic.partition(".")
    return {"X-WC-Webhook-Source": "https://example.com/", "X-WC-Webhook-Topic": topic,
            "X-WC-Webhook-Resource": resource, "X-WC-Webhook-Event": event,
            "X-WC-Webhook-Signature": base64.b64encode(digest).decode(),
            "X-WC-Webhook-ID": "3", "X-WC-Webhook-Delivery-ID": "a1b2c3d4e5f6",
            "User-Agent": "WooCommerce/9.4.0 Hookshot (WordPress/6.7)"}


@pytest.fixture
def shop(start):
    server = start({"woocommerce.secret": SECRET})

    def send(topic: str, body: bytes | Any, **options: Any) -> Any:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return server.post("/hooks/woocommerce", raw=raw,
                           headers=woo_headers(raw, topic, **options))
    send.server = server  # type: ignore[attr-defined]
    return send


def order(**changes: Any) -> dict[str, Any]:
    return {**fixture_json("woocommerce", "order.json"), **changes}


def nothing_stored(db: Any) -> bool:
    return count(db, "events") == 0 and count(db, "dead_letters") == 0 and \
        count(db, "aliases") == 0


def test_a_processing_order_is_a_purchase_on_the_billing_address(shop, db):
    reply = shop("order.created", fixture("woocommerce", "order.json"))
    assert reply.status == 200, reply.body
    assert (reply.body["new"], reply.body["identified"]) == (1, 1)
    # date_created_gmt is UTC written without an offset (date_created is 16:28, local)
    assert stored(db) == [{
        "id": "order:727", "customer": BUYER, "type": "purchase",
        "at": "2017-03-22T19:28:02+00:00", "source": "woocommerce", "order_id": "727",
        "amount": 29.35, "currency": "USD", "skus": ["woo-single-1", "Bar3"]}]
    assert aliases(db) == {"woocommerce:25": BUYER}


def test_a_retry_and_every_update_of_the_order_count_once(shop, db):
    body = fixture("woocommerce", "order.json")
    assert shop("order.created", body).body["new"] == 1
    assert shop("order.created", body).body["duplicates"] == 1  # a redelivery
    completed = order(status="completed", date_completed_gmt="2017-03-25T10:00:00")
    again = shop("order.updated", completed)
    assert (again.status, again.body["new"], again.body["duplicates"]) == (200, 0, 1)
    assert count(db, "events") == 1


def test_a_refund_listed_in_the_order_is_a_return_once(shop, db):
    shop("order.created", fixture("woocommerce", "order.json"))
    partly = order(status="completed", date_modified_gmt="2017-03-24T09:00:00",
                   refunds=[{"id": 730, "reason": "damaged", "total": "-10.00"}])
    reply = shop("order.updated", partly)
    assert reply.status == 200, reply.body
    assert (reply.body["new"], reply.body["duplicates"]) == (1, 1)  # the purchase is known
    wholly = order(status="refunded", date_modified_gmt="2017-03-26T09:00:00",
                   refunds=[{"id": 731, "reason": "", "total": "-19.35"},
                            {"id": 730, "reason": "damaged", "total": "-10.00"}])
    reply = shop("order.updated", wholly)
    assert (reply.body["new"], reply.body["duplicates"]) == (1, 1)
    assert [e for e in stored(db) if e["type"] == "return"] == [
        {"id": "refund:730", "customer": BUYER, "type": "return",
         "at": "2017-03-24T09:00:00+00:00", "source": "woocommerce", "order_id": "727",
         "amount": 10.0, "reason": "damaged"},
        {"id": "refund:731", "customer": BUYER, "type": "return",
         "at": "2017-03-26T09:00:00+00:00", "source": "woocommerce", "order_id": "727",
         "amount": 19.35}]


def test_an_order_marked_refunded_counts_its_refund_once_when_it_is_listed(shop, db):
    """WooCommerce marks the order refunded, then records the refund: the status alone
    gives nothing, the refund listed in the next update gives the return, once."""
    reply = shop("order.updated", order(status="refunded", customer_id=0, refunds=[]))
    assert (reply.status, reply.body.get("ignored"), count(db, "events")) == (200, 1, 0)
    refund = {"id": 900, "reason": "", "total": "-29.35"}
    for _ in range(2):
        shop("order.updated", order(status="refunded", customer_id=0, refunds=[refund]))
    assert [(e["id"], e["amount"]) for e in stored(db)] == [("refund:900", 29.35)]
    assert aliases(db) == {}  # a guest has no WooCommerce id to link


def test_a_cancelled_order_is_a_cancel(shop, db):
    reply = shop("order.updated", order(status="cancelled"))
    assert reply.status == 200, reply.body
    assert stored(db) == [{"id": "cancel:727", "customer": BUYER, "type": "cancel",
                           "at": "2017-03-22T19:28:08+00:00", "source": "woocommerce",
                           "order_id": "727"}]


def test_an_order_without_an_address_lands_on_the_woocommerce_customer(shop, db):
    body = order()
    body["billing"] = {**body["billing"], "email": ""}
    assert shop("order.created", body).status == 200
    assert [e["customer"] for e in stored(db)] == ["woocommerce:25"]
    guest = shop("order.created", {**body, "id": 728, "customer_id": 0})
    assert (guest.status, guest.body["ignored"], guest.body["new"]) == (200, 1, 0)


@pytest.mark.parametrize("status", ["pending", "on-hold", "failed"])
def test_an_order_not_paid_yet_is_ignored(shop, db, status):
    reply = shop("order.created", order(status=status))
    assert (reply.status, reply.body["ignored"]) == (200, 1)
    assert nothing_stored(db)


def test_a_customer_is_an_identify_and_nothing_else(shop, db):
    reply = shop("customer.created", fixture("woocommerce", "customer.json"))
    assert reply.status == 200, reply.body
    assert (reply.body["new"], reply.body["identified"]) == (0, 1)
    assert count(db, "events") == 0
    assert aliases(db) == {"woocommerce:25": BUYER}


def test_the_ping_of_a_new_webhook_is_answered_200_unsigned(shop, db):
    # WC_Webhook::deliver_ping(): a form body, no signature, no X-WC-Webhook-* header
    reply = shop.server.post("/hooks/woocommerce", raw=b"webhook_id=3", headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "User-Agent": "WooCommerce/9.4.0 Hookshot (WordPress/6.7)"})
    assert (reply.status, reply.body["ignored"], reply.body["new"]) == (200, 1, 0)
    assert nothing_stored(db)


@pytest.mark.parametrize("body", [b"webhook_id=3&status=completed", b"webhook_id=x",
                                  b" webhook_id=3", b'{"webhook_id": 3}'])
def test_nothing_else_passes_unsigned(shop, db, body):
    reply = shop.server.post("/hooks/woocommerce", raw=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", "X-WC-Webhook-Topic": "order.created"})
    assert reply.status == 401, reply.body
    assert nothing_stored(db)


@pytest.mark.parametrize("how", ["wrong secret", "no signature", "body changed"])
def test_a_bad_signature_is_401_and_stores_nothing(shop, db, how):
    body = fixture("woocommerce", "order.json")
    headers = woo_headers(body, "order.created",
                          secret="guess" if how == "wrong secret" else SECRET)
    if how == "no signature":
        del headers["X-WC-Webhook-Signature"]
    sent = body.replace(b'"29.35"', b'"2.93"') if how == "body changed" else body
    reply = shop.server.post("/hooks/woocommerce", raw=sent, headers=headers)
    assert reply.status == 401, reply.body
    assert nothing_stored(db)


@pytest.mark.parametrize(("topic", "body", "reason"), [
    ("order.created", b"[727]", "woocommerce: order.created sends an object; this body is list"),
    ("order.updated", json.dumps({"status": "completed", "total": "1.00"}).encode(),
     "woocommerce: the payload has no id"),
    # the topic is not signed: a customer's body under an order's topic, and the reverse
    ("order.updated", fixture("woocommerce", "customer.json"),
     "woocommerce: the payload has no status"),
    ("customer.updated", fixture("woocommerce", "order.json"),
     "woocommerce: customer.updated sends a customer; this body is an order"),
    ("order.created", json.dumps({**fixture_json("woocommerce", "order.json"),
                                  "date_created_gmt": "yesterday"}).encode(),
     "woocommerce: date_created_gmt is not an ISO-8601 time: 'yesterday'"),
])
def test_a_body_that_is_not_what_the_topic_sends_is_400_and_kept(shop, db, topic, body, reason):
    reply = shop(topic, body)
    assert reply.status == 400, reply.body
    assert reply.body["error"] == reason
    assert rows(db, "SELECT origin, reason, raw FROM dead_letters") == [
        ("POST /hooks/woocommerce", reason, body.decode().strip())]
    assert count(db, "events") == 0


def test_no_topic_header_is_400(shop, db):
    body = fixture("woocommerce", "order.json")
    headers = woo_headers(body, "order.created")
    del headers["X-WC-Webhook-Topic"]
    reply = shop.server.post("/hooks/woocommerce", raw=body, headers=headers)
    assert reply.status == 400, reply.body
    assert count(db, "events") == 0 and count(db, "dead_letters") == 1


@pytest.mark.parametrize(("topic", "body"), [
    ("product.created", {"id": 794, "name": "Premium Quality", "sku": "pq-1"}),
    ("order.deleted", {"id": 727}),
    ("customer.deleted", {"id": 25})])
def test_a_topic_it_does_not_map_is_200_and_ignored(shop, db, topic, body):
    reply = shop(topic, body)
    assert (reply.status, reply.body["ignored"], reply.body["new"]) == (200, 1, 0)
    assert nothing_stored(db)


def test_an_address_typed_at_a_checkout_never_takes_another_persons_record(shop, db):
    """Mallory's account (42) orders once with the victim's address as billing email,
    then with an address of her own: the victim keeps their record and their links."""
    victim = "email:victim@example.com"
    assert shop("customer.created", {**fixture_json("woocommerce", "customer.json"),
                                     "id": 7, "email": "victim@example.com"}).status == 200
    assert shop("order.created", order(id=1, customer_id=7, billing={
        **order()["billing"], "email": "victim@example.com"})).body["new"] == 1
    assert shop("customer.created", {**fixture_json("woocommerce", "customer.json"),
                                     "id": 42, "email": "mallory@evil.test"}).status == 200
    for n, typed in ((500, "victim@example.com"), (501, "mallory2@evil.test")):
        reply = shop("order.created", order(id=n, customer_id=42, billing={
            **order()["billing"], "email": typed}))
        assert reply.status == 200, reply.body
    links = aliases(db)
    assert links["woocommerce:7"] == victim
    assert links["woocommerce:42"] == "email:mallory@evil.test"
    assert victim not in links  # the victim is nobody's alias
    # the order typed with the victim's address is the victim's purchase, no more
    assert [(e["id"], e["customer"]) for e in stored(db) if e["type"] == "purchase"] == [
        ("order:1", victim), ("order:500", victim), ("order:501", "email:mallory2@evil.test")]
