"""Built-in plugin: the ``standard`` event source, for hosts that sign their webhooks
the Standard Webhooks way (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``). The body holds canonical events or CloudEvents, as on
``POST /events``.

Settings: ``standard.secret`` (``RETENTION_STANDARD_SECRET``), required.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .. import signing, webevents
from ..delivery import Settings
from ..hookspecs import hookimpl


class StandardSource:
    def __init__(self, settings: Settings):
        self.secret = settings.require("standard", "secret")
        signing.key_of(self.secret)
        self.clock = time.time

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        signing.verify(self.secret, body, headers, now=self.clock())

    def parse(self, body: bytes, headers: Mapping[str, str]) -> list[Any]:
        return webevents.events_of(body, headers)


@hookimpl
def register_sources(register: Any) -> None:
    register("standard", StandardSource)
