"""The bundled example, installed with the package: the commented retail rule file
(every feature of the format), its email templates, and the example events (2,000
customers over 18 months) that ``retention demo`` and the README use::

    from retention import Engine, examples

    engine = Engine.from_path(examples.RULES)
    for event in examples.events(limit=100):
        engine.process(event)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent / "bundled"

#: the retail rule file (the same as ``examples/rules/retail.yaml`` in the repository)
RULES: Path = _HERE / "retail.yaml"
#: the email templates its actions name (``apology``, ``thanks``)
TEMPLATES: Path = _HERE / "templates"
#: the example events, one JSON object a line, in time order
EVENTS: Path = _HERE / "retail.jsonl"


def events(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """The example events as dicts, in time order (the first ``limit`` of them)."""
    with EVENTS.open(encoding="utf-8") as lines:
        for line in itertools.islice(lines, limit):
            yield json.loads(line)
