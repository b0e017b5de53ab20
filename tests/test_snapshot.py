"""Snapshots: a customer's state comes back from its bytes exactly."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import attrs
from hypothesis import given

from retention import Engine, load_texts
from retention.snapshot import decode, encode

from .strategies import event_streams, rule_files


def deep(value):
    """A comparable form of a state: attrs objects as (class, fields), recursively."""
    if attrs.has(type(value)):
        return (type(value).__name__, tuple(deep(getattr(value, f.name))
                                            for f in attrs.fields(type(value))))
    if isinstance(value, dict):
        return {k: deep(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(deep(v) for v in value))
    if isinstance(value, datetime):
        return (value.isoformat(), str(value.tzinfo))
    return value


@given(rule_files(), event_streams())
def test_every_state_comes_back_exactly(text, events):
    engine = Engine(load_texts([("rules.yaml", text)]))
    for event in events:
        engine.process(event)
    for cid in engine.customers():
        original = engine._customers[cid]
        blob = encode(original)
        assert blob[:1] == b"M"  # plain values: the fast form
        assert deep(decode(blob)) == deep(original)


def test_unusual_values_fall_back_to_pickle():
    engine = Engine(load_texts([("rules.yaml", """
rules:
  bought: {when: event.type == "purchase", points: 1}
recognition:
  each: {every: 1, when: event.type == "purchase", then: [gift]}
actions:
  gift: {kind: in_purchase}
""")]))
    at = datetime(2026, 3, 29, 1, 30, tzinfo=ZoneInfo("Europe/Paris"))
    engine.process({"id": "e1", "customer": "c", "type": "purchase", "at": at})
    original = engine._customers["c"]
    blob = encode(original)
    assert blob[:1] == b"P"  # a decision at a time in a zone with rules
    assert deep(decode(blob)) == deep(original)
