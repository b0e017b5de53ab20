"""What the email platforms' adapters (sendgrid, mandrill, postmark) share: the
canonical engagement events (DESIGN.md section 10) and the ``unsubscribe`` that an
address's unsubscribe, spam report or hard bounce adds beside its own event, which
the default ``consent:`` of every rule file reads (docs/adapters.md, "Consent")."""

from __future__ import annotations

from typing import Any

from .common import text

#: the longest URL kept from a click
MAX_URL = 2000


def event(event_id: str, kind: str, customer: str, at: str, **props: Any) -> dict[str, Any]:
    """One canonical event; properties that the payload lacks (None) are left out."""
    return {"id": event_id, "type": kind, "customer": customer, "at": at,
            **{k: v for k, v in props.items() if v is not None}}


def withdrawn(fact: dict[str, Any], reason: str, event_id: str | None = None
              ) -> dict[str, Any]:
    """The ``unsubscribe`` that ``fact`` (a spam report, a hard bounce) implies: the same
    customer and time, keyed on the fact's id + ``:unsubscribe`` unless the platform
    names the suppression itself (``event_id``), and ``reason`` saying why."""
    return event(event_id or fact["id"] + ":unsubscribe", "unsubscribe", fact["customer"],
                 fact["at"], reason=reason, campaign=fact.get("campaign"))


def url(value: Any) -> str | None:
    """A clicked link as kept (text, cut to ``MAX_URL``)."""
    return text(value, MAX_URL) if isinstance(value, str) else None


def label(value: Any) -> str | None:
    """A campaign, tag or category name: text, or the first text of a list."""
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v), None)
    return text(value, 200) if isinstance(value, str) and value else None
