"""Shopify's webhooks as canonical events, on ``POST /hooks/shopify``.

Signature: ``X-Shopify-Hmac-Sha256`` is the base64 of the HMAC-SHA256 of the raw
body keyed with the app's client secret (or, for webhooks made in the admin under
Settings > Notifications > Webhooks, the key that page shows). Shopify signs no
timestamp in that scheme, so there is no freshness to check; ``X-Shopify-Webhook-Id``
names the delivery (a retry keeps it) and is not used: a retry, or a second topic
about the same order, counts once because each event is keyed on Shopify's own id
of the fact (``order:ID``, ``cancel:ID``, ``refund:ID``, ``delivery:ID``).

The topic (``X-Shopify-Topic``) is not signed, so it only says how to read the body:
what an event says comes from the signed body. Every resource Shopify sends names
itself in ``admin_graphql_api_id`` (``gid://shopify/Order/820982911946154508``); a
body of another kind than the topic's (a captured order sent again as
``customers/create``) is refused, and a cancellation needs the order's own
``cancelled_at``.

=========================== ============== ==================================================
topic                       event          fields
=========================== ============== ==================================================
orders/create, orders/paid  ``purchase``   ``order:ID``: amount (total_price), currency,
                                           order_id, skus (the line items' SKUs, at most 100)
orders/updated              ``purchase``   the same id, so an order already seen counts once
                                           (an order cancelled by then is ignored)
orders/cancelled            ``cancel``     ``cancel:ID``: order_id, reason (cancel_reason)
refunds/create              ``return``     ``refund:ID``: order_id, amount (the successful
                                           refund transactions, else the refunded line items'
                                           subtotal and tax), currency
fulfillments/create,        ``delivery``   ``delivery:FULFILLMENT_ID`` once shipment_status is
fulfillments/update                        ``delivered``: order_id
fulfillment_events/create   ``delivery``   the same id, for status ``delivered``: order_id,
                                           delay_days (happened_at after estimated_delivery_at,
                                           in days, 0 when on time) when the event has both
customers/create, /update   ``identify``   ``shopify:ID`` linked to the customer's address
=========================== ============== ==================================================

Any other topic is answered 200 and ignored; a body without the topic header, or not
the resource its topic sends, is 400.

Who: an order's customer is ``email:`` + its address (``email``, else
``customer.email``), else ``shopify:`` + the customer id; an ``identify`` links
``shopify:CUSTOMER_ID`` and ``shopify-order:ORDER_ID`` to them. Refunds and fulfillment
events name no customer, only their order: they land on ``shopify-order:ORDER_ID``,
which is the buyer once the order has been seen. An order with neither an address nor
a customer (an anonymous point-of-sale sale) is about nobody, and ignored.

Times: ``processed_at`` (else ``created_at``) for orders and refunds, ``cancelled_at``,
a fulfillment's ``updated_at``, an event's ``happened_at``, each with the offset
Shopify writes (``2021-12-31T19:00:00-05:00``).

Settings: ``shopify.secret`` (``RETENTION_SHOPIFY_SECRET``), required.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import retention

from .common import (
    BodyError,
    Ignored,
    alias,
    amount,
    body_object,
    customer,
    email_of,
    field,
    hmac_base64,
    identify,
    instant,
    same,
    text,
)

PLATFORM = "shopify"
#: the most SKUs a purchase carries (an order of 5,000 lines is still one purchase)
MAX_SKUS = 100
_DIGITS = re.compile(r"[0-9]{1,20}")

Event = dict[str, Any]


class ShopifySource:
    def __init__(self, settings: Any):
        self.secret = settings.require(PLATFORM, "secret").encode()

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        same(hmac_base64(self.secret, body), headers.get("x-shopify-hmac-sha256"),
             "X-Shopify-Hmac-Sha256 header")

    def parse(self, body: bytes, headers: Mapping[str, str]) -> list[Any]:
        topic = (headers.get("x-shopify-topic") or "").strip()
        if not topic:
            raise BodyError("shopify: no X-Shopify-Topic header")
        known = TOPICS.get(topic)
        if known is None:
            return [Ignored(f"shopify topic {topic[:80]!r}")]
        kind, read = known
        payload = body_object(body, PLATFORM)
        if not isinstance(payload, dict):
            raise BodyError(f"shopify: {topic} sends an object; this body is "
                            f"{type(payload).__name__}")
        _check_kind(payload, kind, topic)
        return read(payload)


# -- orders ---------------------------------------------------------------------------

def purchase(order: Mapping[str, Any]) -> list[Any]:
    if order.get("cancelled_at") is not None:  # (a cancelled order's body, whatever topic)
        return [Ignored("shopify: a cancelled order is no purchase")]
    order_id = _id(order, "id")
    buyer = _buyer(order, order_id)
    if buyer is None:
        return [Ignored("shopify: an order with no email and no customer")]
    who, links = buyer
    event: Event = {"id": f"order:{order_id}", "type": "purchase", "customer": who,
                    "at": _at(order, "processed_at", "created_at"), "order_id": order_id,
                    "amount": amount(field(order, "total_price", platform=PLATFORM),
                                     PLATFORM, "total_price"),
                    "skus": _skus(order)}
    currency = field(order, "currency", platform=PLATFORM, kind=str, required=False)
    if currency:
        event["currency"] = text(currency, 10)
    return [*links, event]


def updated(order: Mapping[str, Any]) -> list[Any]:
    """An update is the order as it stands: a purchase (known by its id if an earlier
    topic brought it), unless it has been cancelled meanwhile."""
    return purchase(order)


def cancel(order: Mapping[str, Any]) -> list[Any]:
    order_id = _id(order, "id")
    # the topic is not signed: the order itself must say it was cancelled
    cancelled_at = instant(field(order, "cancelled_at", platform=PLATFORM), PLATFORM,
                           "cancelled_at")
    buyer = _buyer(order, order_id)
    if buyer is None:
        return [Ignored("shopify: an order with no email and no customer")]
    who, links = buyer
    event: Event = {"id": f"cancel:{order_id}", "type": "cancel", "customer": who,
                    "at": cancelled_at, "order_id": order_id}
    reason = field(order, "cancel_reason", platform=PLATFORM, kind=str, required=False)
    if reason:
        event["reason"] = text(reason, 100)
    return [*links, event]


def _buyer(order: Mapping[str, Any], order_id: str) -> tuple[str, list[Event]] | None:
    """Who placed an order, and the identify linking Shopify's ids of them (their
    customer id, this order) to that customer; None when the order names nobody."""
    person = field(order, "customer", platform=PLATFORM, kind=dict, required=False) or {}
    customer_id = person.get("id")
    address = email_of(order.get("email")) or email_of(person.get("email"))
    if address is None and customer_id is None:
        return None
    who = customer(PLATFORM, address, customer_id)
    links = [alias(PLATFORM, customer_id)] if customer_id is not None else []
    links.append(_order_alias(order_id))
    return who, [{"type": "identify", "customer": who,
                  "aliases": [a for a in links if a != who]}]


def _skus(order: Mapping[str, Any]) -> list[str]:
    lines = field(order, "line_items", platform=PLATFORM, kind=list, required=False) or []
    skus = []
    for n in range(len(lines)):
        sku = field(lines, n, "sku", platform=PLATFORM, kind=str, required=False)
        if sku and sku.strip():
            skus.append(text(sku.strip(), 200))
            if len(skus) == MAX_SKUS:
                break
    return skus


# -- refunds ----------------------------------------------------------------------------

def refund(payload: Mapping[str, Any]) -> list[Any]:
    refund_id, order_id = _id(payload, "id"), _id(payload, "order_id")
    total, currency = _refunded(payload)
    event: Event = {"id": f"refund:{refund_id}", "type": "return",
                    # a refund names its order only: the order's identify says whose it is
                    "customer": _order_alias(order_id),
                    "at": _at(payload, "processed_at", "created_at"), "order_id": order_id,
                    "amount": round(total, 2)}
    if currency:
        event["currency"] = currency
    return [event]


def _refunded(payload: Mapping[str, Any]) -> tuple[float, str | None]:
    """The money a refund gave back: its successful refund transactions, else (a
    refund recorded without moving money yet) its line items' subtotal and tax."""
    total, currency, paid = 0.0, None, False
    transactions = field(payload, "transactions", platform=PLATFORM, kind=list,
                         required=False) or []
    for n in range(len(transactions)):
        kind = field(transactions, n, "kind", platform=PLATFORM, kind=str, required=False)
        status = field(transactions, n, "status", platform=PLATFORM, kind=str,
                       required=False)
        if kind == "refund" and status == "success":
            total += amount(field(transactions, n, "amount", platform=PLATFORM), PLATFORM,
                            f"transactions.{n}.amount")
            currency = currency or text(field(transactions, n, "currency",
                                              platform=PLATFORM, kind=str, required=False), 10)
            paid = True
    if paid:
        return total, currency
    lines = field(payload, "refund_line_items", platform=PLATFORM, kind=list,
                  required=False) or []
    for n in range(len(lines)):
        for part in ("subtotal", "total_tax"):
            value = field(lines, n, part, platform=PLATFORM, required=False)
            if value is not None:
                total += amount(value, PLATFORM, f"refund_line_items.{n}.{part}")
    return total, None


# -- deliveries -------------------------------------------------------------------------

def fulfillment(payload: Mapping[str, Any]) -> list[Any]:
    status = field(payload, "shipment_status", platform=PLATFORM, kind=str, required=False)
    if status != "delivered":
        return [Ignored(f"shopify: a fulfillment {text(status, 40) or 'not shipped'}")]
    fulfillment_id, order_id = _id(payload, "id"), _id(payload, "order_id")
    address = email_of(payload.get("email"))
    who = "email:" + address if address else _order_alias(order_id)
    links = [{"type": "identify", "customer": who, "aliases": [_order_alias(order_id)]}
             ] if address else []
    return [*links, {"id": f"delivery:{fulfillment_id}", "type": "delivery",
                     "customer": who, "at": _at(payload, "updated_at", "created_at"),
                     "order_id": order_id}]


def fulfillment_event(payload: Mapping[str, Any]) -> list[Any]:
    status = field(payload, "status", platform=PLATFORM, kind=str)
    if status != "delivered":
        return [Ignored(f"shopify: a fulfillment event {text(status, 40)}")]
    # keyed on the fulfillment, as fulfillments/update's delivery is: one parcel,
    # one delivery, whichever topic tells it first
    fulfillment_id, order_id = _id(payload, "fulfillment_id"), _id(payload, "order_id")
    at = _at(payload, "happened_at", "created_at")
    event: Event = {"id": f"delivery:{fulfillment_id}", "type": "delivery",
                    "customer": _order_alias(order_id), "at": at, "order_id": order_id}
    promised = field(payload, "estimated_delivery_at", platform=PLATFORM, required=False)
    if promised is not None:
        event["delay_days"] = delay_days(
            at, instant(promised, PLATFORM, "estimated_delivery_at"))
    return [event]


def delay_days(delivered: str, promised: str) -> float:
    """How many days after the promised time a parcel came (0 when on time or early),
    to the hundredth of a day."""
    late = datetime.fromisoformat(delivered) - datetime.fromisoformat(promised)
    return max(0.0, round(late.total_seconds() / 86400, 2))


# -- customers --------------------------------------------------------------------------

def customer_identify(payload: Mapping[str, Any]) -> list[Any]:
    links = identify(PLATFORM, payload.get("email"), _id(payload, "id"))
    return links or [Ignored("shopify: a customer without an email address")]


#: topic -> (the resource its body is, as admin_graphql_api_id names it; the reader)
TOPICS: dict[str, tuple[str, Callable[[Mapping[str, Any]], list[Any]]]] = {
    "orders/create": ("Order", purchase),
    "orders/paid": ("Order", purchase),
    "orders/updated": ("Order", updated),
    "orders/cancelled": ("Order", cancel),
    "refunds/create": ("Refund", refund),
    "fulfillments/create": ("Fulfillment", fulfillment),
    "fulfillments/update": ("Fulfillment", fulfillment),
    "fulfillment_events/create": ("FulfillmentEvent", fulfillment_event),
    "customers/create": ("Customer", customer_identify),
    "customers/update": ("Customer", customer_identify),
}


# -- reading ----------------------------------------------------------------------------

def _check_kind(payload: Mapping[str, Any], kind: str, topic: str) -> None:
    """The signed body must be the resource its (unsigned) topic sends."""
    gid = payload.get("admin_graphql_api_id")
    if gid is None:
        return
    expected = f"gid://shopify/{kind}/"
    if not isinstance(gid, str) or not gid.startswith(expected):
        raise BodyError(f"shopify: {topic} sends {kind} resources; this body is "
                        f"{text(gid, 60)!r}")
    if gid[len(expected):] != _id(payload, "id"):
        raise BodyError(f"shopify: admin_graphql_api_id {gid[:60]!r} is not the body's id")


def _id(payload: Mapping[str, Any], name: str) -> str:
    """One of Shopify's ids (a number, sometimes written as a string), as text."""
    value = field(payload, name, platform=PLATFORM, kind=(int, str))
    written = str(value)
    if not _DIGITS.fullmatch(written):
        raise BodyError(f"shopify: {name} is not an id: {written[:40]!r}")
    return written


def _order_alias(order_id: str) -> str:
    return alias("shopify-order", order_id)


def _at(payload: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = payload.get(name)
        if value is not None:
            return instant(value, PLATFORM, name)
    raise BodyError(f"shopify: the payload has no {' or '.join(names)}")


@retention.hookimpl
def register_sources(register: Any) -> None:
    register(PLATFORM, ShopifySource)
