"""WooCommerce's webhooks as canonical events, on ``POST /hooks/woocommerce``.

Signature: ``X-WC-Webhook-Signature`` is the base64 of the HMAC-SHA256 of the raw body
keyed with the webhook's secret (``WC_Webhook::generate_signature``). WooCommerce signs
no timestamp; each event is keyed on WooCommerce's own id of the fact (``order:ID``,
``cancel:ID``, ``refund:ID``), so a redelivery, or the many ``order.updated`` of one
order, count once.

The ping: when a webhook is saved active, WooCommerce posts the form body
``webhook_id=N`` to check the URL, and keeps the webhook only if it answers 200
(``WC_Webhook::deliver_ping``). That request carries no signature and no
``X-WC-Webhook-*`` header at all, so exactly that body, unsigned, is answered 200 and
ignored; it stores nothing, and anything else unsigned is 401.

The topic header (``X-WC-Webhook-Topic``) is not signed either, so what an event says
comes from the signed body: an order's status, not the topic, decides its event, and an
order body (it has ``line_items``) is never read as a customer, nor the reverse.

================================ ============ ==========================================
order (``order.created``,        status       event
``order.updated``,
``order.restored``)
================================ ============ ==========================================
processing, completed            ``purchase`` ``order:ID``: amount (total), currency,
                                              order_id, skus (at most 100)
cancelled                        ``cancel``   ``cancel:ID``: order_id
any, for each of ``refunds``     ``return``   ``refund:REFUND_ID``: order_id, amount,
                                              reason
refunded, with no ``refunds``    (ignored)    the refund comes listed in the next update
pending, on-hold, failed...      (ignored)
================================ ============ ==========================================

``customer.created`` and ``customer.updated`` give an ``identify`` linking
``woocommerce:ID`` to the account's email. ``*.deleted`` (a body of the id alone) and
other resources are ignored.

Who: ``billing.email``, else ``woocommerce:`` + ``customer_id`` (0 is a guest); an
``identify`` links ``woocommerce:CUSTOMER_ID`` to the address. A guest order without an
address is about nobody, and ignored.

Times: WooCommerce writes ``date_created`` in the shop's local time with no offset, and
``date_created_gmt`` in UTC, also with no offset: the ``_gmt`` fields are read, as UTC.
A purchase is at ``date_created_gmt``; a cancellation and a refund at
``date_modified_gmt``, the last change of the order (an order's refunds carry no time).

Settings: ``woocommerce.secret`` (``RETENTION_WOOCOMMERCE_SECRET``), required: the
Secret field of the webhook (WooCommerce > Settings > Advanced > Webhooks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import retention

from .common import (
    BodyError,
    Ignored,
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

PLATFORM = "woocommerce"
MAX_SKUS = 100
#: the whole body of WooCommerce's ping, as deliver_ping() writes it
_PING = re.compile(rb"webhook_id=([0-9]{1,20})")
_DIGITS = re.compile(r"[0-9]{1,20}")
PURCHASED = frozenset({"processing", "completed"})

Event = dict[str, Any]


class WooCommerceSource:
    def __init__(self, settings: Any):
        self.secret = settings.require(PLATFORM, "secret").encode()

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        given = headers.get("x-wc-webhook-signature")
        if not given and _PING.fullmatch(body):
            return  # WooCommerce's ping is never signed; it stores nothing
        same(hmac_base64(self.secret, body), given, "X-WC-Webhook-Signature header")

    def parse(self, body: bytes, headers: Mapping[str, str]) -> list[Any]:
        ping = _PING.fullmatch(body)
        if ping:
            return [Ignored(f"woocommerce: the ping of webhook {ping[1].decode()}")]
        topic = (headers.get("x-wc-webhook-topic") or "").strip()
        if not topic:
            raise BodyError("woocommerce: no X-WC-Webhook-Topic header")
        resource, _, action = topic.partition(".")
        if resource not in ("order", "customer") or action == "deleted":
            return [Ignored(f"woocommerce topic {topic[:80]!r}")]
        payload = body_object(body, PLATFORM)
        if not isinstance(payload, dict):
            raise BodyError(f"woocommerce: {topic} sends an object; this body is "
                            f"{type(payload).__name__}")
        return order(payload) if resource == "order" else customer_identify(payload, topic)


# -- orders ---------------------------------------------------------------------------

def order(payload: Mapping[str, Any]) -> list[Any]:
    order_id = _id(payload, "id")
    status = field(payload, "status", platform=PLATFORM, kind=str)
    field(payload, "line_items", platform=PLATFORM, kind=list)  # what makes it an order
    buyer = _buyer(payload)
    if buyer is None:
        return [Ignored("woocommerce: a guest order without an email address")]
    who, links = buyer
    base = {"customer": who, "order_id": order_id}
    events: list[Any] = []
    if status in PURCHASED:
        events.append(_purchase(payload, base))
    elif status == "cancelled":
        events.append({**base, "id": f"cancel:{order_id}", "type": "cancel",
                       "at": _utc(payload, "date_modified_gmt", "date_created_gmt")})
    # (an order marked refunded before its refund is listed gives nothing yet: the
    # update that lists the refund gives the return, keyed on the refund, once)
    events.extend(_returns(payload, base))
    if not events:
        return [Ignored(f"woocommerce: an order {text(status, 40)!r}")]
    return [*links, *events]


def _purchase(payload: Mapping[str, Any], base: Event) -> Event:
    event: Event = {**base, "id": f"order:{base['order_id']}", "type": "purchase",
                    "at": _utc(payload, "date_created_gmt"), "amount": _total(payload),
                    "skus": _skus(payload)}
    currency = field(payload, "currency", platform=PLATFORM, kind=str, required=False)
    if currency:
        event["currency"] = text(currency, 10)
    return event


def _returns(payload: Mapping[str, Any], base: Event) -> list[Event]:
    """A return per refund the order lists (``{"id", "reason", "total": "-10.00"}``)."""
    refunds = field(payload, "refunds", platform=PLATFORM, kind=list, required=False) or []
    out: list[Event] = []
    for n in range(len(refunds)):
        refund_id = _id(field(refunds, n, platform=PLATFORM, kind=dict), "id",
                        f"refunds.{n}.id")
        event: Event = {**base, "id": f"refund:{refund_id}", "type": "return",
                        "at": _utc(payload, "date_modified_gmt", "date_created_gmt"),
                        # WooCommerce writes a refund's total negative
                        "amount": abs(amount(field(refunds, n, "total", platform=PLATFORM),
                                             PLATFORM, f"refunds.{n}.total"))}
        reason = field(refunds, n, "reason", platform=PLATFORM, kind=str, required=False)
        if reason:
            event["reason"] = text(reason, 200)
        out.append(event)
    return out


def _buyer(payload: Mapping[str, Any]) -> tuple[str, list[Event]] | None:
    address = email_of(field(payload, "billing", "email", platform=PLATFORM,
                             required=False))
    customer_id = _customer_id(payload)
    if address is None and customer_id is None:
        return None
    return (customer(PLATFORM, address, customer_id),
            identify(PLATFORM, address, customer_id) if customer_id else [])


def _customer_id(payload: Mapping[str, Any]) -> str | None:
    """The order's registered customer, None for a guest (customer_id 0)."""
    value = field(payload, "customer_id", platform=PLATFORM, kind=(int, str), required=False)
    if value is None or str(value) == "0":
        return None
    return _id(payload, "customer_id")


def _total(payload: Mapping[str, Any]) -> float:
    return amount(field(payload, "total", platform=PLATFORM), PLATFORM, "total")


def _skus(payload: Mapping[str, Any]) -> list[str]:
    lines = field(payload, "line_items", platform=PLATFORM, kind=list)
    skus = []
    for n in range(len(lines)):
        sku = field(lines, n, "sku", platform=PLATFORM, kind=str, required=False)
        if sku and sku.strip():
            skus.append(text(sku.strip(), 200))
            if len(skus) == MAX_SKUS:
                break
    return skus


# -- customers --------------------------------------------------------------------------

def customer_identify(payload: Mapping[str, Any], topic: str) -> list[Any]:
    if "line_items" in payload:
        raise BodyError(f"woocommerce: {topic} sends a customer; this body is an order")
    links = identify(PLATFORM, payload.get("email"), _id(payload, "id"))
    return links or [Ignored("woocommerce: a customer without an email address")]


# -- reading ----------------------------------------------------------------------------

def _id(payload: Mapping[str, Any], name: str, what: str | None = None) -> str:
    value = field(payload, name, platform=PLATFORM, kind=(int, str))
    written = str(value)
    if not _DIGITS.fullmatch(written):
        raise BodyError(f"woocommerce: {what or name} is not an id: {written[:40]!r}")
    return written


def _utc(payload: Mapping[str, Any], *names: str) -> str:
    """The first of ``names`` the payload has, a ``_gmt`` time: UTC written without an
    offset (one that has an offset keeps it)."""
    for name in names:
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > 64:
            raise BodyError(f"woocommerce: {name} is not a time: {str(value)[:40]!r}")
        try:
            naive = datetime.fromisoformat(value.strip()).tzinfo is None
        except ValueError:
            raise BodyError(f"woocommerce: {name} is not an ISO-8601 time: "
                            f"{value[:40]!r}") from None
        if naive:
            return datetime.fromisoformat(value.strip()).replace(tzinfo=UTC).isoformat()
        return instant(value, PLATFORM, name)
    raise BodyError(f"woocommerce: the payload has no {' or '.join(names)}")


@retention.hookimpl
def register_sources(register: Any) -> None:
    register(PLATFORM, WooCommerceSource)
