"""HubSpot: its webhooks in (``POST /hooks/hubspot``), tags and tasks out (``via:
hubspot``).

Source. HubSpot posts a JSON array of subscription events, signed
``X-HubSpot-Signature-v3``: the base64 HMAC-SHA256, keyed with the app's client
secret, of ``POST`` + the URI HubSpot called + the body + ``X-HubSpot-Request-Timestamp``
(milliseconds; refused more than five minutes away). The URI is the endpoint URL as
configured in HubSpot (setting ``url``: behind a proxy the server cannot know it),
with HubSpot's percent-decoding applied (``%3A`` to ``:``, ``%2F`` to ``/``...).

- ``contact.propertyChange`` of ``email``: ``identify`` linking ``hubspot:ID`` to the
  address. ``contact.creation`` carries no property, so nothing to link yet: ignored
  (HubSpot sends the email's property change when the address is set).
- ``deal.propertyChange`` of ``dealstage`` to a won stage (``closedwon``, or those in
  ``won_stages``): ``purchase`` (id ``deal:ID``) for the deal's contact, which the
  payload does not name: the associations API gives it, the contact's ``email`` and
  the deal's ``amount``, ``deal_currency_code`` and ``closedate`` are read too. When
  HubSpot's API cannot answer, the body is kept as a dead letter that ``retention
  dead-letters --retry`` hands back here (``webevents.Unavailable``), and HubSpot is
  answered 503 (it sends it again).
- Every other subscription type or property: ignored.

Sink ``hubspot``: ``crm_tag`` sets the contact property ``tag_property`` (default
``retention_level``) to the decision's rule; ``crm_task`` creates a task associated
with the contact, its ``retention_decision_id`` property holding the decision id, and
searched by it first, so a retry never creates two (create that custom task property
in HubSpot, type single-line text). The contact is the customer's ``hubspot:`` id,
else the one a search by email finds.

Settings (``--set hubspot.KEY=...`` or ``RETENTION_HUBSPOT_KEY``): ``secret`` and
``url`` (the source), ``token`` (a private app's access token: the deal lookups and
the sink), ``won_stages`` (comma-separated stage ids, besides ``closedwon``),
``api_url`` (``https://api.hubapi.com``), ``tag_property``, ``owner_id`` (the tasks'
``hubspot_owner_id``, optional), ``timeout`` (seconds, 5).
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

import retention
from retention import http
from retention.delivery import Delivery, DeliveryError, SettingError, Settings
from retention.webevents import Unavailable

from .common import (
    BodyError,
    Ignored,
    alias,
    amount,
    body_object,
    decision_text,
    email_of,
    field,
    hmac_base64,
    identify,
    instant,
    same,
    signed_recently,
)

PLATFORM = "hubspot"
API_URL = "https://api.hubapi.com"
#: the most subscription events one body may hold: HubSpot sends up to 100, and each
#: won deal costs three API calls, so a replayed body within its five minutes costs
#: at most 300 (the store then finds its events known)
MAX_EVENTS = 100
#: the percent-encodings HubSpot decodes in the URI it signs (v3), and only those
_DECODED = {"%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$",
            "%27": "'", "%28": "(", "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";"}
_ENCODED = re.compile("|".join(_DECODED), re.IGNORECASE)
#: the custom task property that carries the decision id (the idempotency key)
DECISION_PROPERTY = "retention_decision_id"
#: HubSpot-defined association type ids (v3 objects API): task to contact
TASK_TO_CONTACT = 204


def signed_uri(url: str) -> str:
    """The URI as HubSpot signs it: the listed percent-encodings decoded."""
    return _ENCODED.sub(lambda m: _DECODED[m.group(0).upper()], url)


class HubSpotApi:
    """HubSpot's CRM API with a private app's token, every call through
    retention.http.request (429 and 5xx worth retrying, other 4xx permanent)."""

    def __init__(self, settings: Settings):
        self.token = settings.require(PLATFORM, "token")
        self.base = settings.get(PLATFORM, "api_url", API_URL).rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise SettingError(f"hubspot: api_url must be an http(s) URL, got {self.base!r}")
        self.timeout = settings.number(PLATFORM, "timeout", 5.0)

    def call(self, method: str, path: str, body: Any = None, accept: tuple[int, ...] = ()
             ) -> http.Answer:
        return http.request(method, self.base + path, body=body, timeout=self.timeout,
                            accept=accept, name=f"HubSpot {method} {path.split('?')[0]}",
                            headers={"authorization": f"Bearer {self.token}",
                                     "accept": "application/json"})

    def json(self, method: str, path: str, body: Any = None) -> Any:
        value = self.call(method, path, body).json()
        if not isinstance(value, dict):
            raise DeliveryError(f"HubSpot {method} {path.split('?')[0]}: the answer is "
                                "not a JSON object")
        return value


def _quoted(value: Any) -> str:
    return urllib.parse.quote(str(value), safe="")


# -- the source ---------------------------------------------------------------------------

class HubSpotSource:
    def __init__(self, settings: Settings):
        self.secret = settings.require(PLATFORM, "secret").encode()
        self.uri = signed_uri(settings.require(PLATFORM, "url"))
        self.settings = settings
        stages = settings.get(PLATFORM, "won_stages", "") or ""
        self.won = {"closedwon"} | {s.strip() for s in stages.split(",") if s.strip()}
        self.clock = time.time
        self._api: HubSpotApi | None = None

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        stamp = headers.get("x-hubspot-request-timestamp")
        signed_recently(stamp, self.clock(), "X-HubSpot-Request-Timestamp", millis=True)
        message = b"POST" + self.uri.encode() + body + stamp.strip().encode()  # type: ignore[union-attr]
        same(hmac_base64(self.secret, message), headers.get("x-hubspot-signature-v3"),
             "X-HubSpot-Signature-v3 header")

    def parse(self, body: bytes, headers: Mapping[str, str]) -> list[Any]:
        events = body_object(body, PLATFORM)
        if not isinstance(events, list):
            raise BodyError("hubspot: the body must be a JSON array of subscription events")
        if len(events) > MAX_EVENTS:
            raise BodyError(f"hubspot: the body holds {len(events)} events, more than "
                            f"{MAX_EVENTS}")
        out: list[Any] = []
        for n, event in enumerate(events):
            if not isinstance(event, dict):
                raise BodyError(f"hubspot: event {n} is {type(event).__name__}, not an object")
            out.extend(self._mapped(event))
        return out

    def _mapped(self, event: dict[str, Any]) -> list[Any]:
        kind = field(event, "subscriptionType", platform=PLATFORM, kind=str)
        if kind == "contact.creation":
            return [Ignored("hubspot: contact.creation names no email yet")]
        if kind == "contact.propertyChange":
            return self._contact_change(event)
        if kind == "deal.propertyChange":
            return self._deal_change(event)
        return [Ignored(f"hubspot: {kind[:60]} is not mapped")]

    def _contact_change(self, event: dict[str, Any]) -> list[Any]:
        if field(event, "propertyName", platform=PLATFORM, kind=str) != "email":
            return [Ignored("hubspot: a contact property other than email")]
        contact = field(event, "objectId", platform=PLATFORM, kind=(int, str))
        alias(PLATFORM, contact)  # an unusable id is refused, whatever the address
        linked = identify(PLATFORM, event.get("propertyValue"), contact)
        return linked or [Ignored("hubspot: the email property holds no address")]

    def _deal_change(self, event: dict[str, Any]) -> list[Any]:
        if field(event, "propertyName", platform=PLATFORM, kind=str) != "dealstage":
            return [Ignored("hubspot: a deal property other than dealstage")]
        stage = field(event, "propertyValue", platform=PLATFORM, kind=str, required=False)
        if stage not in self.won:
            return [Ignored("hubspot: a deal stage that is not won")]
        deal = field(event, "objectId", platform=PLATFORM, kind=(int, str))
        alias(PLATFORM, deal)
        occurred = field(event, "occurredAt", platform=PLATFORM, kind=(int, float))
        at = instant(occurred / 1000, PLATFORM, "occurredAt")
        try:
            return self._won_deal(str(deal).strip(), at)
        except (DeliveryError, SettingError) as exc:
            raise Unavailable(f"hubspot: deal {deal}: the lookup on HubSpot's API "
                              f"failed, kept to retry: {exc}") from None

    def _won_deal(self, deal: str, at: str) -> list[Any]:
        """The purchase of a won deal: its contact, amount and currency from HubSpot."""
        if self._api is None:
            self._api = HubSpotApi(self.settings)
        api = self._api
        links = api.json("GET", f"/crm/v4/objects/deals/{_quoted(deal)}/associations/contacts")
        results = links.get("results")
        if not isinstance(results, list):  # (HubSpot's answer, not the webhook: retried)
            raise DeliveryError("the associations answer has no results")
        contacts = [r.get("toObjectId") for r in results if isinstance(r, dict)]
        if not contacts or contacts[0] is None:
            return [Ignored(f"hubspot: deal {deal} has no contact")]
        contact = contacts[0]  # the first associated contact: the buyer
        properties = _properties(api.json(
            "GET", f"/crm/v3/objects/deals/{_quoted(deal)}"
                   "?properties=amount,deal_currency_code,closedate"))
        person = _properties(api.json(
            "GET", f"/crm/v3/objects/contacts/{_quoted(contact)}?properties=email"))
        address = email_of(person.get("email"))
        purchase: dict[str, Any] = {
            "id": f"deal:{deal}", "type": "purchase", "at": at, "order_id": deal,
            "customer": "email:" + address if address else alias(PLATFORM, contact)}
        if properties.get("amount") not in (None, ""):
            purchase["amount"] = amount(properties["amount"], PLATFORM, "the deal's amount")
        currency = properties.get("deal_currency_code")
        if isinstance(currency, str) and currency.strip():
            purchase["currency"] = currency.strip()[:8].upper()
        return [*identify(PLATFORM, address, contact), purchase]


def _properties(record: dict[str, Any]) -> dict[str, Any]:
    """The ``properties`` of a CRM record HubSpot answered."""
    properties = record.get("properties")
    if properties is None:
        return {}
    if not isinstance(properties, dict):
        raise DeliveryError("a record whose properties are not an object")
    return properties


# -- the sink -----------------------------------------------------------------------------

class HubSpotSink:
    def __init__(self, settings: Settings):
        self.api = HubSpotApi(settings)
        self.tag_property = settings.get(PLATFORM, "tag_property", "retention_level")
        self.owner = settings.get(PLATFORM, "owner_id")

    def deliver(self, delivery: Delivery) -> None:
        # crm_tag (routed here) tags the contact; crm_task, or via: hubspot, is a task
        if delivery.decision.via == "crm_tag":
            self._tag(delivery)
        else:
            self._task(delivery)

    def _contact(self, delivery: Delivery) -> str:
        """The contact's HubSpot id: the customer's hubspot: identifier, else the
        contact a search by email finds."""
        known = delivery.identifier(PLATFORM)
        if known:
            return known
        address = delivery.identifier("email")
        if not address:
            raise DeliveryError(f"customer {delivery.decision.customer} has no HubSpot id "
                                "and no email to find the contact by", permanent=True)
        found = self.api.json("POST", "/crm/v3/objects/contacts/search", {
            "filterGroups": [{"filters": [
                {"propertyName": "email", "operator": "EQ", "value": address}]}],
            "properties": ["email"], "limit": 1}).get("results") or []
        if not found or not isinstance(found[0], dict) or not found[0].get("id"):
            raise DeliveryError(f"no HubSpot contact has the email of customer "
                                f"{delivery.decision.customer}", permanent=True)
        return str(found[0]["id"])

    def _tag(self, delivery: Delivery) -> None:
        contact = self._contact(delivery)
        # setting the same value twice is harmless: a retry changes nothing
        self.api.call("PATCH", f"/crm/v3/objects/contacts/{_quoted(contact)}",
                      {"properties": {self.tag_property: delivery.decision.rule}})

    def _task(self, delivery: Delivery) -> None:
        contact = self._contact(delivery)
        found = self.api.json("POST", "/crm/v3/objects/tasks/search", {
            "filterGroups": [{"filters": [{"propertyName": DECISION_PROPERTY,
                                           "operator": "EQ", "value": delivery.key}]}],
            "properties": [DECISION_PROPERTY], "limit": 1})
        if found.get("total") or found.get("results"):
            return  # created by an earlier try
        decision = delivery.decision
        properties = {
            "hs_task_subject": f"Retention: {decision.action} ({decision.rule})",
            "hs_task_body": decision_text(delivery),
            "hs_timestamp": decision.at.isoformat(),
            "hs_task_status": "NOT_STARTED",
            "hs_task_priority": "HIGH",
            DECISION_PROPERTY: delivery.key}
        if self.owner:
            properties["hubspot_owner_id"] = self.owner
        self.api.call("POST", "/crm/v3/objects/tasks", {
            "properties": properties,
            "associations": [{"to": {"id": contact}, "types": [{
                "associationCategory": "HUBSPOT_DEFINED",
                "associationTypeId": TASK_TO_CONTACT}]}]})


@retention.hookimpl
def register_sources(register: Any) -> None:
    register(PLATFORM, HubSpotSource)


@retention.hookimpl
def register_sinks(register: Any) -> None:
    register(PLATFORM, HubSpotSink)
