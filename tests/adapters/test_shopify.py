"""The shopify source on a real server: Shopify's documented example payloads
(tests/fixtures/shopify/), signed here the way Shopify signs them (the base64 of the
HMAC-SHA256 of the raw body with the app's secret), and what the database holds after."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from retention_adapters.shopify import delay_days

from .conftest import aliases, count, fixture, fixture_json, rows, stored

SECRET = "shpss_6f0d2a1c9e8b7a65"
ORDER = "820982911946154508"
BUYER = "email:jon@example.com"


def shopify_headers(body: bytes, topic: str, secret: str = SECRET,
                    delivery: str = "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043") -> dict[str, str]:
    """The headers Shopify sends with a webhook, the signature computed here."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return {"X-Shopify-Topic": topic, "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
            "X-Shopify-Shop-Domain": "jsmith.myshopify.com", "X-Shopify-API-Version": "2025-01",
            "X-Shopify-Webhook-Id": delivery, "X-Shopify-Triggered-At": "2022-01-01T00:00:00Z"}


@pytest.fixture
def shop(start):
    server = start({"shopify.secret": SECRET})

    def send(topic: str, body: bytes | Any, **options: Any) -> Any:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return server.post("/hooks/shopify", raw=raw,
                           headers=shopify_headers(raw, topic, **options))
    send.server = server  # type: ignore[attr-defined]
    return send


def nothing_stored(db: Any) -> bool:
    return count(db, "events") == 0 and count(db, "dead_letters") == 0 and \
        count(db, "aliases") == 0


def test_an_order_is_a_purchase_on_the_buyers_address_linked_to_their_shopify_ids(shop, db):
    reply = shop("orders/create", fixture("shopify", "orders_create.json"))
    assert reply.status == 200, reply.body
    assert (reply.body["new"], reply.body["identified"]) == (1, 1)
    # the order's own email wins over its customer's, lower-cased; a line without SKU
    # has none in the list
    assert stored(db) == [{
        "id": f"order:{ORDER}", "customer": BUYER, "type": "purchase",
        "at": "2021-12-31T19:00:00-05:00", "source": "shopify", "order_id": ORDER,
        "amount": 403.0, "currency": "USD", "skus": ["SKU2006-001", "SKU2006-020"]}]
    assert aliases(db) == {"shopify:115310627314723954": BUYER,
                           f"shopify-order:{ORDER}": BUYER}


def test_a_retry_and_other_topics_about_the_same_order_count_once(shop, db):
    body = fixture("shopify", "orders_create.json")
    assert shop("orders/create", body).body["new"] == 1
    retry = shop("orders/create", body)  # Shopify's retry: the same delivery again
    assert (retry.status, retry.body["new"], retry.body["duplicates"]) == (200, 0, 1)
    for n, topic in enumerate(("orders/paid", "orders/updated")):
        again = shop(topic, body, delivery=f"another-delivery-{n}")
        assert (again.status, again.body["new"], again.body["duplicates"]) == (200, 0, 1)
    assert count(db, "events") == 1


def test_an_order_of_a_customer_without_address_lands_on_their_shopify_id(shop, db):
    order = fixture_json("shopify", "orders_create.json")
    order["email"] = None
    del order["customer"]["email"]
    assert shop("orders/create", order).status == 200
    [event] = stored(db)
    assert event["customer"] == "shopify:115310627314723954"
    assert aliases(db) == {f"shopify-order:{ORDER}": "shopify:115310627314723954"}


def test_a_cancelled_order_is_a_cancel_and_the_topic_alone_cancels_nothing(shop, db):
    cancelled = fixture("shopify", "orders_cancelled.json")
    reply = shop("orders/cancelled", cancelled)
    assert reply.status == 200, reply.body
    assert stored(db) == [{"id": f"cancel:{ORDER}", "customer": BUYER, "type": "cancel",
                           "at": "2022-01-02T08:30:00-05:00", "source": "shopify",
                           "order_id": ORDER, "reason": "customer"}]
    # the topic is not signed: an order that was not cancelled, sent as orders/cancelled
    placed = fixture("shopify", "orders_create.json")
    refused = shop("orders/cancelled", placed)
    assert refused.status == 400, refused.body
    assert refused.body["error"] == "shopify: the payload has no cancelled_at"
    assert count(db, "events") == 1 and count(db, "dead_letters") == 1
    # a cancelled order's body is no purchase, whatever (unsigned) topic it comes under
    for topic in ("orders/updated", "orders/paid", "orders/create"):
        late = shop(topic, cancelled)
        assert (late.status, late.body["ignored"], late.body["new"]) == (200, 1, 0), topic


def test_a_refund_is_a_return_on_the_buyer_of_its_order(shop, db):
    shop("orders/create", fixture("shopify", "orders_create.json"))
    reply = shop("refunds/create", fixture("shopify", "refunds_create.json"))
    assert reply.status == 200, reply.body
    [refund] = [e for e in stored(db) if e["type"] == "return"]
    assert refund == {"id": "refund:890088186047892319", "customer": BUYER, "type": "return",
                      "at": "2022-01-05T11:00:00-05:00", "source": "shopify",
                      "order_id": ORDER, "amount": 89.99, "currency": "USD"}
    assert shop("refunds/create", fixture("shopify", "refunds_create.json")
                ).body["duplicates"] == 1


def test_a_refund_before_its_order_joins_the_buyer_when_the_order_comes(shop, db):
    assert shop("refunds/create", fixture("shopify", "refunds_create.json")).status == 200
    assert [e["customer"] for e in stored(db)] == [f"shopify-order:{ORDER}"]
    assert shop("orders/create", fixture("shopify", "orders_create.json")).status == 200
    assert {e["type"]: e["customer"] for e in stored(db)} == {"purchase": BUYER,
                                                               "return": BUYER}


def test_a_refund_without_transactions_counts_its_line_items(shop, db):
    refund = fixture_json("shopify", "refunds_create.json")
    refund["transactions"] = []
    refund["refund_line_items"][0].update(subtotal=50.0, total_tax=4.5)
    assert shop("refunds/create", refund).status == 200
    [event] = stored(db)
    assert (event["amount"], event["customer"]) == (54.5, f"shopify-order:{ORDER}")
    assert "currency" not in event


def test_a_delivery_is_keyed_on_its_fulfillment_and_late_against_the_estimate(shop, db):
    shop("orders/create", fixture("shopify", "orders_create.json"))
    reply = shop("fulfillment_events/create", fixture("shopify",
                                                      "fulfillment_events_create.json"))
    assert reply.status == 200, reply.body
    [delivery] = [e for e in stored(db) if e["type"] == "delivery"]
    # happened 2022-01-07 14:00, estimated 2022-01-04 14:00 (both -05:00): 3 days late
    assert delivery == {"id": "delivery:123456", "customer": BUYER, "type": "delivery",
                        "at": "2022-01-07T14:00:00-05:00", "source": "shopify",
                        "order_id": ORDER, "delay_days": 3.0}
    # the fulfillment's own update about the same parcel is the same delivery
    again = shop("fulfillments/update", fixture("shopify", "fulfillments_update.json"))
    assert (again.status, again.body["new"], again.body["duplicates"]) == (200, 0, 1)


def test_a_fulfillment_is_a_delivery_once_delivered(shop, db):
    fulfillment = fixture_json("shopify", "fulfillments_update.json")
    fulfillment["shipment_status"] = "in_transit"
    moving = shop("fulfillments/create", fulfillment)
    assert (moving.status, moving.body["ignored"]) == (200, 1)
    assert nothing_stored(db)
    done = shop("fulfillments/update", fixture("shopify", "fulfillments_update.json"))
    assert done.status == 200, done.body
    assert stored(db) == [{"id": "delivery:123456", "customer": BUYER, "type": "delivery",
                           "at": "2022-01-04T15:20:00-05:00", "source": "shopify",
                           "order_id": ORDER}]
    assert aliases(db) == {f"shopify-order:{ORDER}": BUYER}


def test_an_early_delivery_is_no_delay():
    assert delay_days("2022-01-03T10:00:00-05:00", "2022-01-04T10:00:00-05:00") == 0.0
    assert delay_days("2022-01-04T22:00:00+00:00", "2022-01-04T10:00:00-05:00") == 0.29


def test_a_customer_is_an_identify_and_nothing_else(shop, db):
    reply = shop("customers/create", fixture("shopify", "customers_create.json"))
    assert reply.status == 200, reply.body
    assert (reply.body["new"], reply.body["identified"]) == (0, 1)
    assert count(db, "events") == 0
    assert aliases(db) == {"shopify:706405506930370084": "email:bob@biller.com"}
    assert shop("customers/update", fixture("shopify", "customers_create.json")
                ).status == 200


@pytest.mark.parametrize("how", ["wrong secret", "no signature", "body changed"])
def test_a_bad_signature_is_401_and_stores_nothing(shop, db, how):
    body = fixture("shopify", "orders_create.json")
    headers = shopify_headers(body, "orders/create",
                              secret="guess" if how == "wrong secret" else SECRET)
    if how == "no signature":
        del headers["X-Shopify-Hmac-Sha256"]
    sent = body.replace(b"403.00", b"4.03") if how == "body changed" else body
    reply = shop.server.post("/hooks/shopify", raw=sent, headers=headers)
    assert reply.status == 401, reply.body
    assert nothing_stored(db)


@pytest.mark.parametrize(("topic", "body", "reason"), [
    ("orders/create", b"[1, 2]", "shopify: orders/create sends an object; this body is list"),
    ("orders/create", json.dumps({"total_price": "1.00", "email": "a@b.c",
                                  "processed_at": "2022-01-01T00:00:00Z"}).encode(),
     "shopify: the payload has no id"),
    # a customer's body (signed) sent again under an order's topic
    ("orders/create", fixture("shopify", "customers_create.json"),
     "shopify: orders/create sends Order resources; this body is "
     "'gid://shopify/Customer/706405506930370084'"),
    ("refunds/create", json.dumps({"id": "12; drop", "order_id": 1}).encode(),
     "shopify: id is not an id: '12; drop'"),
])
def test_a_body_that_is_not_what_the_topic_sends_is_400_and_kept(shop, db, topic, body, reason):
    reply = shop(topic, body)
    assert reply.status == 400, reply.body
    assert reply.body["error"] == reason
    assert rows(db, "SELECT origin, reason, raw FROM dead_letters") == [
        ("POST /hooks/shopify", reason, body.decode().strip())]
    assert count(db, "events") == 0


def test_no_topic_header_is_400(shop, db):
    body = fixture("shopify", "orders_create.json")
    headers = shopify_headers(body, "orders/create")
    del headers["X-Shopify-Topic"]
    reply = shop.server.post("/hooks/shopify", raw=body, headers=headers)
    assert reply.status == 400, reply.body
    assert reply.body["error"] == "shopify: no X-Shopify-Topic header"
    assert count(db, "events") == 0 and count(db, "dead_letters") == 1


def test_a_topic_it_does_not_map_is_200_and_ignored(shop, db):
    reply = shop("products/create", {"id": 788032119674292922, "title": "Example T-Shirt"})
    assert (reply.status, reply.body["ignored"], reply.body["new"]) == (200, 1, 0)
    assert nothing_stored(db)
