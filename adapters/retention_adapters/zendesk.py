"""Zendesk: its event webhooks in (``POST /hooks/zendesk``), tickets out (``via:
zendesk``).

Source. A webhook subscribed to Zendesk events posts one event per request
(``type: zen:event-type:...``, its own ``id``, ``time``, the object in ``detail``, the
change in ``event``), signed ``X-Zendesk-Webhook-Signature``: the base64 HMAC-SHA256,
keyed with the webhook's signing secret, of ``X-Zendesk-Webhook-Signature-Timestamp``
(ISO-8601, refused more than five minutes away) followed by the body.

- ``ticket.created``: ``complaint`` on the requester (``zendesk:`` + ``requester_id``:
  ticket events carry no address; a user event links it to one) with ``ticket_id``,
  ``subject``, ``text`` (the description, cut to 4000 characters) and ``priority``.
- ``ticket.status_changed`` to solved: ``ticket_resolved`` with the same ``ticket_id``,
  which the retail rules' recovery matches on.
- a satisfaction rating (``ticket.satisfaction_rating_changed``, ``event.current`` the
  rating: ``{"score": "good" | "bad", "comment": ...}`` or the score alone):
  ``review`` with ``rating`` 5 for good, 1 for bad, ``text`` the comment; an offered
  or withdrawn rating is ignored.
- ``user.*`` events whose ``detail`` has an email: ``identify`` linking
  ``zendesk:ID`` to the address.
- every other type: ignored.

Each event's id is Zendesk's own id of the event, so a redelivery counts once.

Sink ``zendesk``: ``crm_task`` (any decision routed here) becomes a ticket assigned
to ``group_id``, requested by the customer's email (else their ``zendesk:`` id), its
``external_id`` the decision id: a ticket with that external id is looked up first,
so a retry never opens two.

Settings (``--set zendesk.KEY=...`` or ``RETENTION_ZENDESK_KEY``): ``secret`` (the
source); ``subdomain`` (or ``api_url``, default ``https://SUBDOMAIN.zendesk.com``),
``email`` and ``token`` (an API token: basic auth ``EMAIL/token:TOKEN``), ``group_id``
(optional), ``priority`` (of the tickets, ``high``), ``timeout`` (seconds, 10) for the
sink.
"""

from __future__ import annotations

import base64
import time
import urllib.parse
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import retention
from retention import http, signing
from retention.delivery import Delivery, DeliveryError, SettingError, Settings

from .common import (
    BodyError,
    Ignored,
    SignatureError,
    alias,
    body_object,
    customer,
    decision_text,
    email_of,
    field,
    hmac_base64,
    identify,
    instant,
    same,
    text,
)

PLATFORM = "zendesk"
EVENT_TYPE = "zen:event-type:"
#: a satisfaction score as a review's rating (of 5)
RATINGS = {"good": 5, "bad": 1}


def stamp_seconds(stamp: str | None, now: float) -> float:
    """The seconds of Zendesk's signed timestamp (ISO-8601), refused when missing,
    unreadable or more than five minutes away."""
    what = "X-Zendesk-Webhook-Signature-Timestamp"
    if not stamp or len(stamp) > 40:
        raise SignatureError(f"no {what}")
    try:
        moment = datetime.fromisoformat(stamp.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SignatureError(f"the {what} is not an ISO-8601 time") from None
    if moment.tzinfo is None:
        raise SignatureError(f"the {what} has no time zone")
    if abs(now - moment.timestamp()) > signing.TOLERANCE:
        raise SignatureError(f"the {what} is more than {signing.TOLERANCE / 60:g} minutes "
                             "away: a replay, or a clock to set")
    return moment.timestamp()


# -- the source ---------------------------------------------------------------------------

class ZendeskSource:
    def __init__(self, settings: Settings):
        self.secret = settings.require(PLATFORM, "secret").encode()
        self.clock = time.time

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        stamp = headers.get("x-zendesk-webhook-signature-timestamp")
        stamp_seconds(stamp, self.clock())
        same(hmac_base64(self.secret, stamp.encode() + body),  # type: ignore[union-attr]
             headers.get("x-zendesk-webhook-signature"), "X-Zendesk-Webhook-Signature header")

    def parse(self, body: bytes, headers: Mapping[str, str]) -> list[Any]:
        payload = body_object(body, PLATFORM)
        if not isinstance(payload, dict):
            raise BodyError("zendesk: the body must be one event (a JSON object)")
        kind = field(payload, "type", platform=PLATFORM, kind=str)
        if not kind.startswith(EVENT_TYPE):
            raise BodyError(f"zendesk: type {kind[:60]!r} is not a Zendesk event type")
        kind = kind[len(EVENT_TYPE):]
        if kind == "ticket.created":
            return [self._complaint(payload)]
        if kind == "ticket.status_changed":
            return self._status_changed(payload)
        if kind == "ticket.satisfaction_rating_changed":
            return self._rating(payload)
        if kind.startswith("user."):
            return self._user(payload)
        return [Ignored(f"zendesk: {kind[:60]} is not mapped")]

    def _base(self, payload: dict[str, Any], kind: str) -> dict[str, Any]:
        """What every ticket event gives: its id, time, requester and ticket id."""
        event_id = field(payload, "id", platform=PLATFORM, kind=(str, int))
        ticket = field(payload, "detail", "id", platform=PLATFORM, kind=(str, int))
        requester = field(payload, "detail", "requester_id", platform=PLATFORM,
                          kind=(str, int))
        if len(str(event_id)) > 200:
            raise BodyError(f"zendesk: an event id of {len(str(event_id)):,} characters")
        return {"id": str(event_id), "type": kind,
                "at": instant(field(payload, "time", platform=PLATFORM), PLATFORM, "time"),
                "customer": customer(PLATFORM, None, requester),
                "ticket_id": alias(PLATFORM, ticket).partition(":")[2]}

    def _complaint(self, payload: dict[str, Any]) -> dict[str, Any]:
        event = self._base(payload, "complaint")
        detail = payload["detail"]
        for name, key in (("subject", "subject"), ("text", "description"),
                          ("priority", "priority")):
            value = text(field(detail, key, platform=PLATFORM, kind=str, required=False))
            if value:
                event[name] = value.lower() if name == "priority" else value
        return event

    def _status_changed(self, payload: dict[str, Any]) -> list[Any]:
        status = field(payload, "event", "current", platform=PLATFORM, kind=str)
        if status.strip().lower() != "solved":
            return [Ignored(f"zendesk: a ticket now {status[:20]!r}, not solved")]
        return [self._base(payload, "ticket_resolved")]

    def _rating(self, payload: dict[str, Any]) -> list[Any]:
        rating = field(payload, "event", "current", platform=PLATFORM, kind=(dict, str))
        score = rating if isinstance(rating, str) else field(
            rating, "score", platform=PLATFORM, kind=str)
        if score.strip().lower() not in RATINGS:  # offered, unoffered: no rating yet
            return [Ignored(f"zendesk: a satisfaction score {score[:20]!r}")]
        event = self._base(payload, "review")
        # one review per ticket: a rating switched good, bad, good is one opinion,
        # not three reviews (the first one counts; a change is a duplicate)
        event["id"] = f"review:{event['ticket_id']}"
        event["rating"] = RATINGS[score.strip().lower()]
        comment = text(rating.get("comment")) if isinstance(rating, dict) else None
        if comment:
            event["text"] = comment
        return [event]

    def _user(self, payload: dict[str, Any]) -> list[Any]:
        user = field(payload, "detail", "id", platform=PLATFORM, kind=(str, int))
        alias(PLATFORM, user)
        linked = identify(PLATFORM, field(payload, "detail", "email", platform=PLATFORM,
                                          required=False), user)
        return linked or [Ignored("zendesk: a user event with no email")]


# -- the sink -----------------------------------------------------------------------------

class ZendeskSink:
    def __init__(self, settings: Settings):
        api_url = settings.get(PLATFORM, "api_url")
        if api_url is None:
            subdomain = settings.require(PLATFORM, "subdomain")
            if not subdomain.replace("-", "").isalnum():
                raise SettingError(f"zendesk: subdomain must be a name like acme, got "
                                   f"{subdomain!r}")
            api_url = f"https://{subdomain}.zendesk.com"
        if not api_url.startswith(("http://", "https://")):
            raise SettingError(f"zendesk: api_url must be an http(s) URL, got {api_url!r}")
        self.base = api_url.rstrip("/")
        login = f"{settings.require(PLATFORM, 'email')}/token:{settings.require(PLATFORM, 'token')}"
        self.auth = "Basic " + base64.b64encode(login.encode()).decode()
        group = settings.get(PLATFORM, "group_id")
        if group is not None and not (group.isascii() and group.isdigit()):
            raise SettingError(f"zendesk: group_id must be a number, got {group!r}")
        self.group = int(group) if group is not None else None
        self.priority = settings.get(PLATFORM, "priority", "high")
        self.timeout = settings.number(PLATFORM, "timeout", 10.0)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        answer = http.request(method, self.base + path, body=body, timeout=self.timeout,
                              name=f"Zendesk {method} {path.split('?')[0]}",
                              headers={"authorization": self.auth,
                                       "accept": "application/json"})
        value = answer.json()
        if not isinstance(value, dict):
            raise DeliveryError(f"Zendesk {method} {path}: the answer is not a JSON object")
        return value

    def deliver(self, delivery: Delivery) -> None:
        found = self._call("GET", "/api/v2/tickets.json?external_id="
                           + urllib.parse.quote(delivery.key, safe=""))
        if found.get("tickets"):
            return  # opened by an earlier try
        self._call("POST", "/api/v2/tickets.json", {"ticket": self._ticket(delivery)})

    def _ticket(self, delivery: Delivery) -> dict[str, Any]:
        decision = delivery.decision
        ticket: dict[str, Any] = {
            "subject": f"Retention: {decision.action} for {decision.customer}"[:150],
            "comment": {"body": decision_text(delivery), "public": False},
            "external_id": delivery.key, "priority": self.priority,
            "tags": ["retention", _tag(decision.rule)]}
        address = email_of(delivery.identifier("email"))
        requester = delivery.identifier(PLATFORM)
        if address:
            # (a name is needed when Zendesk has no user with that address yet)
            ticket["requester"] = {"email": address, "name": address.partition("@")[0]}
        elif requester and requester.isascii() and requester.isdigit():
            ticket["requester_id"] = int(requester)
        else:
            raise DeliveryError(f"customer {decision.customer} has no email and no Zendesk "
                                "id to open a ticket for", permanent=True)
        if self.group is not None:
            ticket["group_id"] = self.group
        return ticket


def _tag(name: str) -> str:
    """A Zendesk tag: no spaces."""
    return "retention_" + "".join(c if c.isalnum() else "_" for c in name.lower())[:60]


@retention.hookimpl
def register_sources(register: Any) -> None:
    register(PLATFORM, ZendeskSource)


@retention.hookimpl
def register_sinks(register: Any) -> None:
    register(PLATFORM, ZendeskSink)
