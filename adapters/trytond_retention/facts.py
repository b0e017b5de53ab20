"""Tryton's records as the engine's canonical events (DESIGN.md section 10).

The customer is the party: ``email:`` + its address when it has one, else
``tryton:PARTY_ID``; every event of a party with an address comes with the
``identify`` linking ``tryton:PARTY_ID`` to it, so the party's form finds its
customer either way. An event's id is Tryton's own id of the fact, prefixed by its
kind (``sale:12``, ``return:13``, ``credit:7``, ``complaint:4``, ``resolved:4``), so a sale
confirmed, processed and processed again is one purchase. Every event names its
source, ``tryton``, embedded or posted to a server alike.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from retention_adapters.common import alias, customer, identify, text

PLATFORM = "tryton"
#: the most SKUs kept from one sale
MAX_SKUS = 100


def party_alias(party: Any) -> str:
    """The engine's identifier of a party: ``tryton:ID``."""
    return alias(PLATFORM, party.id)


def party_id(identifier: str) -> int | None:
    """The party an engine identifier names (``tryton:12`` is 12), or None. Digits
    are ASCII: ``int()`` would read other scripts' digits as another party's id."""
    scheme, _, value = identifier.partition(":")
    if scheme == PLATFORM and value.isascii() and value.isdigit():
        return int(value)
    return None


def customer_of(party: Any) -> str:
    return customer(PLATFORM, party.email, party.id)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def identify_party(party: Any, email: str | None = None) -> list[dict[str, Any]]:
    """The ``identify`` linking ``tryton:ID`` to the party's address (none without)."""
    return [{**event, "source": PLATFORM} for event in
            identify(PLATFORM, email if email is not None else party.email, party.id)]


def sale_events(sale: Any) -> list[dict[str, Any]]:
    """A confirmed sale: a ``purchase``, or a ``return`` when its total is negative (a
    return sale, as a complaint's action makes them)."""
    total = float(sale.total_amount or 0)
    lines = [line for line in sale.lines if line.type == 'line']
    common = {"customer": customer_of(sale.party), "at": now(), "source": PLATFORM,
              "order_id": sale.number or str(sale.id),
              "currency": sale.currency.code if sale.currency else None}
    if total < 0:
        event = {"id": f"return:{sale.id}", "type": "return", **common,
                 "amount": -total}
    else:
        skus = [line.product.code for line in lines
                if line.product and line.product.code][:MAX_SKUS]
        event = {"id": f"sale:{sale.id}", "type": "purchase", **common,
                 "amount": total, "lines": len(lines), "skus": skus}
    return [*identify_party(sale.party), event]


def credit_events(invoice: Any) -> list[dict[str, Any]]:
    """A credit note posted (a customer invoice whose total is negative): a ``return``
    of its amount."""
    return [*identify_party(invoice.party), {
        "id": f"credit:{invoice.id}", "type": "return",
        "customer": customer_of(invoice.party), "at": now(), "source": PLATFORM,
        "order_id": invoice.number or str(invoice.id),
        "currency": invoice.currency.code if invoice.currency else None,
        "amount": -float(invoice.total_amount)}]


def complaint_events(complaint: Any) -> list[dict[str, Any]]:
    """A complaint submitted (waiting): a ``complaint`` with its id as ``ticket_id``
    and its description as ``text``."""
    return [*identify_party(complaint.customer), {
        "id": f"complaint:{complaint.id}", "type": "complaint",
        "customer": customer_of(complaint.customer), "at": now(), "source": PLATFORM,
        "ticket_id": str(complaint.id),
        "subject": text(complaint.reference or complaint.number or
                        (complaint.type.name if complaint.type else None), 200),
        "text": text(complaint.description)}]


def resolved_events(complaint: Any) -> list[dict[str, Any]]:
    """A complaint done: ``ticket_resolved`` with the complaint's ``ticket_id``."""
    return [{"id": f"resolved:{complaint.id}", "type": "ticket_resolved",
             "customer": customer_of(complaint.customer), "at": now(),
             "source": PLATFORM, "ticket_id": str(complaint.id)}]
