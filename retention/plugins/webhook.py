"""Built-in plugin: the ``webhook`` sink POSTs a decision as JSON, signed the Standard
Webhooks way.

The body is ``{"type": "retention.decision", "data": {...the decision...}}``; the
headers ``webhook-id`` (the decision id, the same on every try: the idempotency
key), ``webhook-timestamp`` and ``webhook-signature`` (``v1,`` and the base64
HMAC-SHA256 of ``id.timestamp.body``). A 2xx answer is a delivery; 408, 429 and
5xx, or no answer, are tried again later; another 4xx fails for good. A redirect is
not followed: it is a failure, tried again later.

Settings (``--set webhook.KEY=...`` or ``RETENTION_WEBHOOK_KEY``): ``url`` and
``secret`` (required; ``whsec_<base64>`` or plain text), ``timeout`` (seconds, 10).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

from .. import signing
from ..delivery import Delivery, DeliveryError, SettingError, Settings, decision_payload
from ..hookspecs import hookimpl

_RETRIED = {408, 425, 429}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not a delivery: urllib would follow a 301/302/303
    with a GET without the body, and a 2xx to that GET would count as delivered."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


class WebhookSink:
    def __init__(self, settings: Settings):
        self.url = settings.require("webhook", "url")
        if not self.url.startswith(("http://", "https://")):
            raise SettingError(f"webhook: url must be an http(s) URL, got {self.url!r}")
        self.secret = settings.require("webhook", "secret")
        signing.key_of(self.secret)  # a malformed whsec_ secret stops here
        self.timeout = settings.number("webhook", "timeout", 10.0)
        self.clock = time.time

    def deliver(self, delivery: Delivery) -> None:
        body = decision_payload(delivery.decision)
        headers = signing.sign(self.secret, delivery.key, int(self.clock()), body)
        headers["content-type"] = "application/json"
        headers["user-agent"] = "retention-engine"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with _opener.open(request, timeout=self.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            permanent = 400 <= exc.code < 500 and exc.code not in _RETRIED
            note = " (redirects are not followed: set webhook.url to where it points)" \
                if 300 <= exc.code < 400 else ""
            raise DeliveryError(f"{self.url} answered {exc.code} {exc.reason}{note}",
                                permanent=permanent) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DeliveryError(f"{self.url}: {reason}") from None


@hookimpl
def register_sinks(register: Any) -> None:
    register("webhook", WebhookSink)
