"""Built-in plugin: the ``webhook`` sink POSTs a decision as JSON, signed the Standard
Webhooks way.

The body is ``{"type": "retention.decision", "data": {...the decision...}}``; the
headers ``webhook-id`` (the decision id, the same on every try: the idempotency
key), ``webhook-timestamp`` and ``webhook-signature`` (``v1,`` and the base64
HMAC-SHA256 of ``id.timestamp.body``). A 2xx answer is a delivery; 408, 429 and
5xx, or no answer, are tried again later (after ``Retry-After`` when a 429 or 503
gives one); another 4xx fails for good. A redirect is not followed: it is a failure,
tried again later (see ``retention.http``).

Settings (``--set webhook.KEY=...`` or ``RETENTION_WEBHOOK_KEY``): ``url`` and
``secret`` (required; ``whsec_<base64>`` or plain text), ``timeout`` (seconds, 10).
"""

from __future__ import annotations

import time
from typing import Any

from .. import http, signing
from ..delivery import Delivery, SettingError, Settings, decision_payload
from ..hookspecs import hookimpl


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
        http.request("POST", self.url, headers=headers, body=body, timeout=self.timeout)


@hookimpl
def register_sinks(register: Any) -> None:
    register("webhook", WebhookSink)
