"""Webhook signatures the Standard Webhooks way, both directions.

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``; the signature is
HMAC-SHA256 with the secret, base64-encoded and prefixed ``v1,``. A secret written
``whsec_<base64>`` is the base64 of the key; any other secret is used as UTF-8 bytes.
``webhook-signature`` may list several space-separated signatures (during a key
rotation): one valid signature is enough.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

from .errors import RetentionError

#: how far a signed timestamp may be from the clock, either way (seconds)
TOLERANCE = 300


class SignatureError(RetentionError):
    """A request whose signature is missing, wrong or too old."""


def key_of(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        return secret
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[6:], validate=True)
        except binascii.Error:
            raise SignatureError("the secret starts with whsec_ but is not base64") from None
    return secret.encode()


def signature(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of ``body`` (one ``v1,`` signature)."""
    signed = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.new(key_of(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers that sign ``body``."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, msg_id, timestamp, body)}


def verify(secret: str | bytes, body: bytes, headers: Mapping[str, str], *,
           now: float, tolerance: int = TOLERANCE) -> str:
    """Check the Standard Webhooks headers of ``body`` (header names in lower case);
    returns the message id or raises SignatureError saying what is wrong."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    given = headers.get("webhook-signature")
    if not msg_id or not stamp or not given:
        missing = [n for n, v in (("webhook-id", msg_id), ("webhook-timestamp", stamp),
                                  ("webhook-signature", given)) if not v]
        raise SignatureError(f"missing signature header {', '.join(missing)}")
    timestamp = _seconds(stamp)
    if timestamp is None:
        raise SignatureError("webhook-timestamp is not a number of seconds")
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"webhook-timestamp is more than {tolerance // 60} minutes "
                             "from the server's clock")
    expected = signature(secret, msg_id, timestamp, body).encode()
    ok = False
    for candidate in given.split():
        # every candidate is compared, in constant time, whatever the earlier ones gave
        ok |= hmac.compare_digest(candidate.encode(), expected)
    if not ok:
        raise SignatureError("bad signature")
    return msg_id


def message_key(body: bytes, headers: Mapping[str, str]) -> bytes | None:
    """What identifies a signed message: a digest of exactly what its signature covers
    (``webhook-id``, ``webhook-timestamp`` as the number it is, and the body), or None
    without a ``webhook-id``. Only the secret's holder can make a new one; a copy of a
    captured request, whatever its other headers say, has the same key."""
    msg_id = headers.get("webhook-id")
    if not msg_id:
        return None
    timestamp = _seconds(headers.get("webhook-timestamp", ""))
    signed = b"%s.%d.%s" % (msg_id.encode(), -1 if timestamp is None else timestamp, body)
    return hashlib.sha256(signed).digest()


def _seconds(stamp: str) -> int | None:
    """A timestamp's seconds, written in ASCII digits only: ``int`` would also take
    ``+17``, ``1_7`` or other scripts' digits, spellings of the same signed number
    that could pass for another message."""
    stamp = stamp.strip()
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 18:
        return None
    return int(stamp)
