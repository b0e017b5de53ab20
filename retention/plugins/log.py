"""Built-in plugin: the ``log`` sink writes each decision as one JSON line.

Settings: ``log.path`` (``RETENTION_LOG_PATH``), a file the lines are appended to;
without it they are written to standard output, one line per decision.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..delivery import Delivery, DeliveryError, Settings, decision_payload
from ..hookspecs import hookimpl


class LogSink:
    def __init__(self, settings: Settings):
        path = settings.get("log", "path")
        self.path = Path(path) if path else None

    def deliver(self, delivery: Delivery) -> None:
        line = decision_payload(delivery.decision).decode()
        if self.path is None:
            _write_stdout(line)
            return
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        except OSError as exc:
            raise DeliveryError(f"log sink: cannot write {self.path}: {exc.strerror}") from None


def _write_stdout(line: str) -> None:
    """One line on standard output, flushed at once (a decision is delivered when it
    is written); escaped to ASCII where the output cannot encode the text."""
    out = sys.stdout
    if out is None:
        raise DeliveryError("log sink: no standard output to write to (set log.path)")
    try:
        try:
            out.write(line + "\n")
        except UnicodeEncodeError:
            out.write(json.dumps(json.loads(line), separators=(",", ":")) + "\n")
        out.flush()
    except (OSError, ValueError) as exc:  # a closed pipe, a closed stream
        raise DeliveryError(f"log sink: cannot write to standard output: {exc}") from None


@hookimpl
def register_sinks(register: Any) -> None:
    register("log", LogSink)
