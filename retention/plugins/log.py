"""Built-in plugin: the ``log`` sink writes each decision as one JSON line.

Settings: ``log.path`` (``RETENTION_LOG_PATH``), a file the lines are appended to;
without it they go to the ``retention.deliveries`` logger at level INFO.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..delivery import Delivery, DeliveryError, Settings, decision_payload
from ..hookspecs import hookimpl

logger = logging.getLogger("retention.deliveries")


class LogSink:
    def __init__(self, settings: Settings):
        path = settings.get("log", "path")
        self.path = Path(path) if path else None

    def deliver(self, delivery: Delivery) -> None:
        line = decision_payload(delivery.decision).decode()
        if self.path is None:
            logger.info("%s", line)
            return
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        except OSError as exc:
            raise DeliveryError(f"log sink: cannot write {self.path}: {exc.strerror}") from None


@hookimpl
def register_sinks(register: Any) -> None:
    register("log", LogSink)
