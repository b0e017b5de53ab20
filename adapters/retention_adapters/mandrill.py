"""The ``mandrill`` event source: Mandrill's (Mailchimp Transactional's) message event
webhooks, on ``POST /hooks/mandrill``.

Mandrill posts a form with one field, ``mandrill_events``, a JSON array of events.
It signs the request in ``X-Mandrill-Signature``: the base64 HMAC-SHA1, with the
webhook's key, of the webhook URL exactly as configured in Mandrill followed by each
POST field's name and value, names sorted. Before it posts to a new URL Mandrill
checks it with an unsigned ``HEAD`` (the server answers 200 for a loaded source);
should that fail, it posts ``mandrill_events=[]`` signed with the key
``test-webhook``, which is answered 200 and stores nothing.

==============  ======================================================================
send            ``email_delivered``
open            ``email_open``
click           ``email_click`` with ``url``
hard_bounce     ``email_bounce`` with ``hard: true``, and ``unsubscribe``
soft_bounce     ``email_bounce`` with ``hard: false``
spam            ``spam_report`` and ``unsubscribe``
unsub           ``unsubscribe``
deferral,       ignored (counted in the answer's ``ignored``): a delay, or a message
reject          Mandrill refused to send (for a bounce, complaint or unsubscribe it
                reported when it happened); so are sync events (``type: whitelist`` or
                ``blacklist``) and any other event
==============  ======================================================================

A message opens and is clicked many times, so an event's id is ``mandrill:`` + the
event + its ``_id`` (the message's) + its ``ts``: ``mandrill:open:<_id>:<ts>``; two
opens of one message within the same second count once. The ``unsubscribe`` beside a
spam complaint or a hard bounce has that id + ``:unsubscribe``. The customer is
``email:`` + the message's ``msg.email``; ``campaign`` is its first tag.

Settings: ``mandrill.key`` (the webhook's key, Settings > Webhooks, column Key) and
``mandrill.url`` (the Post To URL exactly as entered in Mandrill, trailing slash and
query string included).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import retention
from retention.delivery import Settings

from . import mailing
from .common import (
    BodyError,
    Ignored,
    SignatureError,
    body_object,
    email_of,
    field,
    hmac_base64,
    instant,
    same,
    text,
)

PLATFORM = "mandrill"
#: the key Mandrill signs its check of a new webhook URL with (an empty batch)
CHECK_KEY = b"test-webhook"
#: a Mandrill form has one field today; a few more are allowed for what it may add
MAX_FIELDS = 20


def form_of(body: bytes) -> list[tuple[str, str]]:
    """The fields of a form-encoded body, in order; ValueError when it is not one (not
    UTF-8 once percent-decoded, a field without ``=``, a name given twice)."""
    fields = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=True,
                       encoding="utf-8", errors="strict", max_num_fields=MAX_FIELDS)
    if len({name for name, _ in fields}) != len(fields):
        raise ValueError("a field is given twice")
    return fields


def signed_content(url: str, fields: list[tuple[str, str]]) -> bytes:
    """What Mandrill signs: the URL, then each field's name and value, names sorted."""
    return (url + "".join(name + value for name, value in sorted(fields))).encode("utf-8")


class MandrillSource:
    def __init__(self, settings: Settings):
        self.key = settings.require(PLATFORM, "key").encode()
        self.url = settings.require(PLATFORM, "url")
        self.check_signature = hmac_base64(CHECK_KEY, signed_content(
            self.url, [("mandrill_events", "[]")]), "sha1")

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            fields = form_of(body)
        except (UnicodeError, ValueError):
            raise SignatureError("the body is not the form Mandrill signs") from None
        given = headers.get("x-mandrill-signature")
        expected = hmac_base64(self.key, signed_content(self.url, fields), "sha1")
        try:
            same(expected, given, "X-Mandrill-Signature header")
        except SignatureError:
            # Mandrill's check of a new URL: an empty batch, signed with a known key
            if given and fields == [("mandrill_events", "[]")] and hmac.compare_digest(
                    self.check_signature.encode(), given.strip().encode()):
                return
            raise

    def parse(self, body: bytes, headers: Mapping[str, str]) -> list[Any]:
        try:
            fields = dict(form_of(body))
        except (UnicodeError, ValueError) as exc:
            raise BodyError(f"mandrill: the body is not a form: {exc}") from None
        if "mandrill_events" not in fields:
            raise BodyError("mandrill: the form has no mandrill_events")
        batch = body_object(fields["mandrill_events"].encode(), PLATFORM)
        if not isinstance(batch, list):
            raise BodyError("mandrill: mandrill_events is not a JSON array of events")
        if not batch:
            return [Ignored("mandrill: an empty batch (Mandrill checking the webhook URL)")]
        out: list[Any] = []
        for n, item in enumerate(batch, 1):
            out.extend(events_of(item, n))
        return out


def events_of(item: Any, n: int) -> list[Any]:
    """The canonical events of one Mandrill event (the ``n``-th of its batch)."""
    if not isinstance(item, dict):
        raise BodyError(f"mandrill: event {n} is {type(item).__name__}, not an object")
    if "event" not in item and "type" in item:
        return [Ignored(f"mandrill: sync events ({text(item['type'], 40)}) are not mapped")]
    kind = field(item, "event", platform=PLATFORM, kind=str)
    if kind not in _MAPPED:
        return [Ignored(f"mandrill: {kind[:40]!r} events are not mapped")]
    msg = field(item, "msg", platform=PLATFORM, kind=dict)
    email = field(msg, "email", platform=PLATFORM, kind=str)
    address = email_of(email)
    if address is None:
        return [Ignored(f"mandrill: event {n} is for {email[:60]!r}, not an address")]
    message_id = field(item, "_id", platform=PLATFORM, kind=str).strip()
    if not message_id or len(message_id) > 200 or not message_id.isprintable():
        raise BodyError(f"mandrill: event {n} has an unusable _id")
    ts = field(item, "ts", platform=PLATFORM, kind=int)
    fact = mailing.event(f"mandrill:{kind}:{message_id}:{ts}", _MAPPED[kind],
                         "email:" + address, instant(ts, PLATFORM, "ts"),
                         campaign=mailing.label(msg.get("tags")))
    if kind == "click":
        fact["url"] = mailing.url(item.get("url"))
    elif kind in ("hard_bounce", "soft_bounce"):
        fact["hard"] = kind == "hard_bounce"
        reason = text(msg.get("bounce_description"), 500)
        if reason:
            fact["reason"] = reason
    fact = {k: v for k, v in fact.items() if v is not None}
    if kind == "spam":
        return [fact, mailing.withdrawn(fact, "spam report")]
    if kind == "hard_bounce":
        return [fact, mailing.withdrawn(fact, "hard bounce")]
    return [fact]


#: Mandrill's event -> the canonical type
_MAPPED = {"send": "email_delivered", "open": "email_open", "click": "email_click",
           "hard_bounce": "email_bounce", "soft_bounce": "email_bounce",
           "spam": "spam_report", "unsub": "unsubscribe"}


@retention.hookimpl
def register_sources(register: Any) -> None:
    register(PLATFORM, MandrillSource)
