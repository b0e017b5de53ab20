"""Matchers: what turns the text of a rule's ``when`` into a Condition.

The plugins fill ``MATCHERS`` through the ``register_matchers`` hook; the built-in
``python`` matcher (the safe expression language compiled to Python) is the default
of every rule. A rule picks another with ``matcher: NAME``. A matcher's result is
called as ``condition(event, props, customer)`` and must have the attributes
``source``, ``event_types`` (the event types it can match, or None for any) and
``customer_fields`` (the ``customer.*`` fields it reads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DEFAULT = "python"

MATCHERS: dict[str, Callable[[str], Any]] = {}
