"""Shared hypothesis strategies: rule files and event streams that exercise every clause."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import strategies as st

START = datetime(2026, 1, 1, tzinfo=UTC)
TYPES = ("purchase", "late", "complaint", "resolved", "review", "ping", "unsubscribe",
         "subscribe", "billing")


@st.composite
def rule_files(draw) -> str:
    """A valid rule file (YAML text) using a random selection of the features."""
    low = draw(st.sampled_from([0, -20, 10]))
    high = low + draw(st.sampled_from([60, 100, 150]))
    initial = draw(st.integers(low + 10, high))
    lines = [f"capital: {{initial: {initial}, min: {low}, max: {high}}}", "rules:"]
    fade = draw(st.sampled_from([
        "fades_over: 20d", "half_life: 10d", "fades: {rate: 10%, per: 7d}",
        "fades_over: 15d, keep: 0.5", "half_life: 5d, keep: 0.3"]))
    lines.append(f"  late: {{when: event.type == \"late\", points: -{draw(st.integers(3, 40))}, "
                 f"{fade}}}")
    repeat = draw(st.booleans())
    lines.append("  billing: {when: event.type == \"billing\", points: "
                 f"-{draw(st.integers(2, 30))}"
                 + (", repeat: {within: 30d, factor: 1.5}" if repeat else "") + "}")
    complaint_fades = draw(st.sampled_from(["", ", fades_over: 10d", ", half_life: 6d, keep: 0.4"]))
    lines.append(f"  complaint: {{when: event.type == \"complaint\", points: "
                 f"-{draw(st.integers(2, 30))}{complaint_fades}}}")
    lines.append("  resolved: {when: event.type == \"resolved\", recovers: complaint, "
                 f"match: ticket, within: 5d, refund: {draw(st.sampled_from([1.0, 0.5]))}, "
                 f"bonus: {draw(st.integers(0, 5))}}}")
    lines.append(f"  bought: {{when: event.type == \"purchase\", points: "
                 f"{draw(st.integers(0, 8))}}}")
    lines.append("  reviewed: {when: event.type == \"review\" and customer.capital < 90, "
                 "points: 3, category: contribution, then: [thanks]}")
    if draw(st.booleans()):
        lines.append(f"silence: {{after: {draw(st.integers(2, 30))}d, "
                     f"rate_per_day: {draw(st.sampled_from([0.5, 1, 2]))}}}")
    if draw(st.booleans()):
        lines.append(f"licence: {{clean_for: {draw(st.integers(5, 40))}d, "
                     f"points: {draw(st.integers(1, 10))}}}")
    below_hi = draw(st.integers(low + 5, high))
    below_lo = draw(st.integers(low + 1, below_hi))
    lines.append("levels:")
    lines.append(f"  - {{name: watch, below: {below_hi}, rearm: {draw(st.integers(0, 10))}, "
                 "then: [flag]}")
    lines.append(f"  - {{name: rupture, below: {below_lo}, then: [call, gesture], "
                 f"holdout: {draw(st.sampled_from([0, 0.3]))}}}")
    lines.append("recognition:")
    lines.append(f"  nth: {{every: {draw(st.integers(1, 3))}, when: event.type == \"purchase\", "
                 "then: [{discount: {percent: 5}}]}")
    lines.append("  card: {after: {purchases: 3, or_spent: 100, within: 30d}, then: [flag]}")
    if draw(st.booleans()):
        lines.append(f"pressure: {{max: {draw(st.integers(0, 2))}, per: 7d}}")
    lines.append("actions:")
    lines.append("  flag: {kind: service, via: crm_tag}")
    lines.append("  call: {kind: service, via: crm_task}")
    lines.append("  gesture: {kind: marketing, via: email}")
    lines.append("  thanks: {kind: marketing, via: email}")
    lines.append("  discount: {kind: in_purchase}")
    return "\n".join(lines) + "\n"


@st.composite
def event_streams(draw, customers=("a", "b"), max_size=25) -> list[dict]:
    """Events with unique ids for a few customers over ~4 months, in time order.

    Times are whole seconds apart or more, so no two events of a customer tie.
    """
    count = draw(st.integers(1, max_size))
    offsets = draw(st.lists(st.integers(0, 120 * 86400), min_size=count, max_size=count,
                            unique=True))
    events = []
    for index, offset in enumerate(sorted(offsets)):
        kind = draw(st.sampled_from(TYPES))
        event = {"id": f"e{index}", "customer": draw(st.sampled_from(customers)),
                 "type": kind, "at": (START + timedelta(seconds=offset)).isoformat()}
        if kind in ("complaint", "resolved"):
            event["ticket"] = draw(st.sampled_from(["t1", "t2"]))
        if kind == "purchase":
            event["amount"] = draw(st.integers(1, 80))
        events.append(event)
    return events


def moments(draw_from=st) -> st.SearchStrategy[str]:
    return draw_from.integers(0, 200 * 86400).map(
        lambda s: (START + timedelta(seconds=s)).isoformat())
