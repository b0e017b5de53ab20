"""The ``postmark`` event source: Postmark's webhooks, on ``POST /hooks/postmark``.

Postmark signs nothing: its webhooks are protected with HTTP basic auth, a username
and password written in the webhook URL (``https://USER:PASSWORD@host/hooks/postmark``),
which Postmark sends in the ``Authorization`` header; a missing or wrong one is 401.
Each request is one JSON record, told by its ``RecordType``:

==================  ==================================================================
Delivery            ``email_delivered``
Bounce              ``email_bounce``: ``hard`` for the types that say the address takes
                    no mail (``HardBounce``, ``BadEmailAddress``), which also send
                    ``unsubscribe``; the others (``SoftBounce``, ``Transient``,
                    ``DnsError``, ``AutoResponder``, ``Blocked``...) are not hard
Open                ``email_open`` (``first_open``)
Click               ``email_click`` with ``url`` (the ``OriginalLink``)
SpamComplaint       ``spam_report`` and ``unsubscribe``
SubscriptionChange  ``unsubscribe`` when ``SuppressSending`` is true, ``subscribe`` when
                    it is false (a reactivation), with ``list`` (the message stream)
others              ignored (counted in the answer's ``ignored``)
==================  ==================================================================

Ids: a bounce or a spam complaint is keyed on Postmark's record ``ID``
(``pm:bounce:42``, ``pm:spam:42``); a delivery on the ``MessageID`` and the recipient
(one delivery each); an open or a click on those and its ``ReceivedAt`` (a message
opens many times). Postmark also sends a ``SubscriptionChange`` for the suppression a
hard bounce or a spam complaint causes, so every ``unsubscribe`` is keyed on the
message, the address and the suppression's reason (``HardBounce``, ``SpamComplaint``,
``ManualSuppression``): the Bounce and its SubscriptionChange count once. A
suppression with no message (made in Postmark's UI or API) and a reactivation are
keyed on the address and ``ChangedAt``.

Settings: ``postmark.username`` and ``postmark.password``, the ones in the webhook URL.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from typing import Any

import retention
from retention.delivery import Settings

from . import mailing
from .common import BodyError, Ignored, SignatureError, body_object, email_of, field, instant, text

PLATFORM = "postmark"
#: the bounce types that say the address takes no mail (Postmark's bounce types list:
#: HardBounce "unknown user, mailbox not found", BadEmailAddress "not a valid address")
HARD = ("HardBounce", "BadEmailAddress")


class PostmarkSource:
    def __init__(self, settings: Settings):
        self.username = settings.require(PLATFORM, "username").encode()
        self.password = settings.require(PLATFORM, "password").encode()

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        given = headers.get("authorization")
        if not given:
            raise SignatureError("no HTTP basic auth: put the username and password in the "
                                 "webhook URL (https://USER:PASSWORD@host/hooks/postmark)")
        scheme, _, token = given.strip().partition(" ")
        if scheme.lower() != "basic":
            raise SignatureError("the Authorization header is not HTTP basic auth")
        try:
            credentials = base64.b64decode(token.strip(), validate=True)
        except binascii.Error:
            raise SignatureError("the basic auth credentials are not base64") from None
        username, colon, password = credentials.partition(b":")
        # both compared, in constant time, whatever the first gave
        right = hmac.compare_digest(username, self.username)
        right &= hmac.compare_digest(password, self.password)
        if not (colon and right):
            raise SignatureError("wrong username or password")

    def parse(self, body: bytes, headers: Mapping[str, str]) -> list[Any]:
        record = body_object(body, PLATFORM)
        if not isinstance(record, dict):
            raise BodyError("postmark: the body is not a JSON object")
        kind = field(record, "RecordType", platform=PLATFORM, kind=str)
        read = _RECORDS.get(kind)
        if read is None:
            return [Ignored(f"postmark: {kind[:40]!r} records are not mapped")]
        return read(record)


def _address(record: dict[str, Any], name: str) -> str:
    email = field(record, name, platform=PLATFORM, kind=str)
    address = email_of(email)
    if address is None:
        raise BodyError(f"postmark: {name} is not an address: {email[:60]!r}")
    return address


def _token(record: dict[str, Any], name: str, required: bool = True) -> str | None:
    """An id of the record (``ID``, ``MessageID``) as the text of an event id."""
    value = field(record, name, platform=PLATFORM, kind=(str, int), required=required)
    if value is None:
        return None
    value = str(value).strip()
    if not value or len(value) > 200 or not value.isprintable():
        raise BodyError(f"postmark: unusable {name} {value[:40]!r}")
    return value


def _time(record: dict[str, Any], name: str) -> tuple[str, str]:
    """A record's time as given (for ids) and as the event's ``at``."""
    given = field(record, name, platform=PLATFORM, kind=str)
    return given.strip(), instant(given, PLATFORM, name)


def _unsubscribe_id(message_id: str | None, address: str, reason: str, when: str) -> str:
    if message_id:
        return f"pm:unsubscribe:{message_id}:{address}:{reason}"
    return f"pm:unsubscribe:{address}:{when}"


def delivery(record: dict[str, Any]) -> list[Any]:
    address = _address(record, "Recipient")
    message_id = _token(record, "MessageID")
    _, at = _time(record, "DeliveredAt")
    return [mailing.event(f"pm:delivery:{message_id}:{address}", "email_delivered",
                          "email:" + address, at, campaign=mailing.label(record.get("Tag")))]


def bounce(record: dict[str, Any]) -> list[Any]:
    kind = field(record, "Type", platform=PLATFORM, kind=str)
    if kind == "SpamComplaint":  # (a complaint read through the bounce webhook)
        return spam_complaint(record)
    address = _address(record, "Email")
    _, at = _time(record, "BouncedAt")
    fact = mailing.event(f"pm:bounce:{_token(record, 'ID')}", "email_bounce",
                         "email:" + address, at, hard=kind in HARD, bounce_type=kind[:100],
                         reason=text(record.get("Description"), 500),
                         campaign=mailing.label(record.get("Tag")))
    if not fact["hard"]:
        return [fact]
    return [fact, mailing.withdrawn(fact, "hard bounce", _unsubscribe_id(
        _token(record, "MessageID", required=False), address, "HardBounce", at))]


def spam_complaint(record: dict[str, Any]) -> list[Any]:
    address = _address(record, "Email")
    _, at = _time(record, "BouncedAt")
    fact = mailing.event(f"pm:spam:{_token(record, 'ID')}", "spam_report", "email:" + address,
                         at, campaign=mailing.label(record.get("Tag")))
    return [fact, mailing.withdrawn(fact, "spam report", _unsubscribe_id(
        _token(record, "MessageID", required=False), address, "SpamComplaint", at))]


def open_(record: dict[str, Any]) -> list[Any]:
    address = _address(record, "Recipient")
    when, at = _time(record, "ReceivedAt")
    first = record.get("FirstOpen")
    return [mailing.event(f"pm:open:{_token(record, 'MessageID')}:{address}:{when}",
                          "email_open", "email:" + address, at,
                          first_open=first if isinstance(first, bool) else None,
                          campaign=mailing.label(record.get("Tag")))]


def click(record: dict[str, Any]) -> list[Any]:
    address = _address(record, "Recipient")
    when, at = _time(record, "ReceivedAt")
    return [mailing.event(f"pm:click:{_token(record, 'MessageID')}:{address}:{when}",
                          "email_click", "email:" + address, at,
                          url=mailing.url(record.get("OriginalLink")),
                          campaign=mailing.label(record.get("Tag")))]


def subscription_change(record: dict[str, Any]) -> list[Any]:
    address = _address(record, "Recipient")
    when, at = _time(record, "ChangedAt")
    suppressed = field(record, "SuppressSending", platform=PLATFORM, kind=bool)
    stream = mailing.label(record.get("MessageStream"))
    if not suppressed:
        return [mailing.event(f"pm:subscribe:{address}:{when}", "subscribe",
                              "email:" + address, at, list=stream)]
    reason = field(record, "SuppressionReason", platform=PLATFORM, kind=str,
                   required=False) or "ManualSuppression"
    if not reason.isprintable():
        raise BodyError("postmark: SuppressionReason is not printable text")
    return [mailing.event(
        _unsubscribe_id(_token(record, "MessageID", required=False), address, reason[:40],
                        when),
        "unsubscribe", "email:" + address, at, list=stream, reason=reason[:100],
        campaign=mailing.label(record.get("Tag")))]


_RECORDS = {"Delivery": delivery, "Bounce": bounce, "SpamComplaint": spam_complaint,
            "Open": open_, "Click": click, "SubscriptionChange": subscription_change}


@retention.hookimpl
def register_sources(register: Any) -> None:
    register(PLATFORM, PostmarkSource)
