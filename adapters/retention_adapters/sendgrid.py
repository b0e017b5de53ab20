"""The ``sendgrid`` event source: SendGrid's signed Event Webhook, on
``POST /hooks/sendgrid``.

SendGrid signs each batch with ECDSA (P-256, SHA-256) over the
``X-Twilio-Email-Event-Webhook-Timestamp`` header followed by the raw body; the
signature, base64 DER, is in ``X-Twilio-Email-Event-Webhook-Signature``. The body is
a JSON array of events, each with ``email``, ``timestamp`` (seconds), ``event`` and
``sg_event_id``:

==================  ==================================================================
delivered           ``email_delivered``
open                ``email_open`` (``machine_open`` when SendGrid says a machine did)
click               ``email_click`` with ``url``
bounce              ``email_bounce``: ``hard`` for ``type: bounce``, not for
                    ``type: blocked``; a hard one also sends ``unsubscribe``
dropped             ``email_bounce`` with ``dropped: true``; ``hard`` when the reason
                    is ``Bounced Address`` or ``Invalid`` (the address takes no mail),
                    which also sends ``unsubscribe``
spamreport          ``spam_report`` and ``unsubscribe``
unsubscribe         ``unsubscribe``
group_unsubscribe   ``unsubscribe`` with ``list`` (the ``asm_group_id``)
group_resubscribe   ``subscribe`` with ``list``
processed,          ignored (counted in the answer's ``ignored``), as is any other
deferred            event
==================  ==================================================================

An event's id is ``sg:`` + its ``sg_event_id`` (the ``unsubscribe`` beside a spam
report or a hard bounce: that id + ``:unsubscribe``); its customer ``email:`` + the
address; ``campaign`` is the ``marketing_campaign_name``, else the ``category``.

Settings: ``sendgrid.public_key`` (``RETENTION_SENDGRID_PUBLIC_KEY``), the
verification key of Settings > Mail Settings > Event Webhook, as SendGrid shows it
(base64 of the DER public key) or in PEM.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

import retention
from retention.delivery import SettingError, Settings

from . import mailing
from .common import (
    BodyError,
    Ignored,
    SignatureError,
    body_object,
    email_of,
    field,
    instant,
    signed_recently,
    text,
)

PLATFORM = "sendgrid"
SIGNATURE = "x-twilio-email-event-webhook-signature"
TIMESTAMP = "x-twilio-email-event-webhook-timestamp"
#: what SendGrid sends that is no fact about the customer
IGNORED = ("processed", "deferred")
#: the reasons of a drop that say the address takes no mail (its own bounce list, or
#: an address SendGrid found invalid)
HARD_DROPS = ("Bounced Address", "Invalid")


def public_key(value: str) -> ec.EllipticCurvePublicKey:
    """The verification key as SendGrid shows it (base64 DER), or PEM; SettingError
    when it is neither, or not a P-256 key."""
    try:
        if "-----BEGIN" in value:
            key = serialization.load_pem_public_key(value.strip().encode())
        else:
            der = base64.b64decode("".join(value.split()), validate=True)
            key = serialization.load_der_public_key(der)
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        raise SettingError("sendgrid: public_key is not the Event Webhook's verification "
                           "key (base64 DER, or PEM)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise SettingError("sendgrid: public_key is not an ECDSA P-256 key")
    return key


class SendGridSource:
    def __init__(self, settings: Settings):
        self.key = public_key(settings.require(PLATFORM, "public_key"))
        self.clock = time.time

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        stamp = headers.get(TIMESTAMP) or ""
        signed_recently(stamp, self.clock(), "X-Twilio-Email-Event-Webhook-Timestamp")
        given = headers.get(SIGNATURE)
        if not given:
            raise SignatureError("no X-Twilio-Email-Event-Webhook-Signature header")
        try:
            signature = base64.b64decode(given.strip(), validate=True)
        except binascii.Error:
            raise SignatureError("X-Twilio-Email-Event-Webhook-Signature is not base64"
                                 ) from None
        try:
            self.key.verify(signature, stamp.strip().encode() + body,
                            ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise SignatureError("wrong X-Twilio-Email-Event-Webhook-Signature") from None

    def parse(self, body: bytes, headers: Mapping[str, str]) -> list[Any]:
        batch = body_object(body, PLATFORM)
        if not isinstance(batch, list):
            raise BodyError("sendgrid: the body is not a JSON array of events")
        out: list[Any] = []
        for n, item in enumerate(batch, 1):
            out.extend(events_of(item, n))
        return out


def events_of(item: Any, n: int) -> list[Any]:
    """The canonical events of one SendGrid event (the ``n``-th of its batch)."""
    if not isinstance(item, dict):
        raise BodyError(f"sendgrid: event {n} is {type(item).__name__}, not an object")
    kind = field(item, "event", platform=PLATFORM, kind=str)
    if kind in IGNORED or kind not in _MAPPED:
        return [Ignored(f"sendgrid: {kind[:40]!r} events are not mapped")]
    email = field(item, "email", platform=PLATFORM, kind=str)
    address = email_of(email)
    if address is None:  # SendGrid reports drops for addresses that are none
        return [Ignored(f"sendgrid: event {n} is for {email[:60]!r}, not an address")]
    sg_id = field(item, "sg_event_id", platform=PLATFORM, kind=str).strip()
    if not sg_id or len(sg_id) > 200 or not sg_id.isprintable():
        raise BodyError(f"sendgrid: event {n} has an unusable sg_event_id")
    fact = mailing.event(
        "sg:" + sg_id, _MAPPED[kind], "email:" + address,
        instant(field(item, "timestamp", platform=PLATFORM, kind=(int, float)),
                PLATFORM, "timestamp"),
        campaign=mailing.label(item.get("marketing_campaign_name"))
        or mailing.label(item.get("category")))
    return _detail(kind, item, fact)


def _detail(kind: str, item: dict[str, Any], fact: dict[str, Any]) -> list[Any]:
    """``fact`` with what its kind of event adds, and the ``unsubscribe`` it implies."""
    if kind == "open" and item.get("sg_machine_open") is True:
        fact["machine_open"] = True
    elif kind == "click":
        fact["url"] = mailing.url(item.get("url"))
    elif kind == "bounce":
        fact["hard"] = item.get("type") == "bounce"
        fact["reason"] = text(item.get("reason"), 500)
    elif kind == "dropped":
        reason = item.get("reason")
        fact.update(dropped=True, hard=reason in HARD_DROPS, reason=text(reason, 500))
    elif kind in ("group_unsubscribe", "group_resubscribe"):
        group = field(item, "asm_group_id", platform=PLATFORM, kind=(int, str))
        fact["list"] = str(group)
    fact = {k: v for k, v in fact.items() if v is not None}
    if kind == "spamreport":
        return [fact, mailing.withdrawn(fact, "spam report")]
    if fact.get("hard"):
        return [fact, mailing.withdrawn(fact, "hard bounce")]
    return [fact]


#: SendGrid's event -> the canonical type
_MAPPED = {"delivered": "email_delivered", "open": "email_open", "click": "email_click",
           "bounce": "email_bounce", "dropped": "email_bounce", "spamreport": "spam_report",
           "unsubscribe": "unsubscribe", "group_unsubscribe": "unsubscribe",
           "group_resubscribe": "subscribe"}


@retention.hookimpl
def register_sources(register: Any) -> None:
    register(PLATFORM, SendGridSource)
