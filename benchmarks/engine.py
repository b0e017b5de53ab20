"""Throughput of ``Engine.process`` and cost of ``tick``, with the retail rules.

    python benchmarks/engine.py                    # 1,000,000 events, 100,000 customers
    python benchmarks/engine.py --events 200000 --customers 20000 --tick-customers 200000

Prints events per second for ``process`` called once per event and for
``process_many`` in batches (events given as JSON-like dicts, so validation and
time parsing are included), the time of a ``tick`` that finds 1%
of the N customers due (N / 100 customers) in a population of N and in one of
10 N customers, and the peak resident memory. The two tick times should be
close: a tick costs what the due customers cost, not what the population does.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retention import Engine
from retention.times import from_seconds

RULES = Path(__file__).resolve().parent.parent / "examples" / "rules" / "retail.yaml"
START = datetime(2025, 1, 1, tzinfo=UTC)
SPAN = 540 * 86400.0

# (type, weight, properties) of what follows a first purchase
_MIX = [
    ("purchase", 30), ("delivery", 25), ("email_open", 15), ("review", 4), ("rating", 5),
    ("complaint", 4), ("ticket_resolved", 3), ("price_compare", 5), ("page_view", 5),
    ("return", 2), ("billing_error", 1), ("unsubscribe", 1),
]


def generate(customers: int, per_customer: float, seed: int) -> list[dict]:
    """A time-ordered stream: each customer opens with a purchase, then a mix."""
    rng = random.Random(seed)
    kinds = [k for k, _ in _MIX]
    weights = [w for _, w in _MIX]
    rows: list[tuple[float, dict]] = []
    serial = 0
    for c in range(customers):
        cid = f"c{c:07d}"
        t = rng.random() * SPAN * 0.5
        count = max(1, int(rng.expovariate(1.0 / per_customer)))
        for i in range(count):
            kind = "purchase" if i == 0 else rng.choices(kinds, weights)[0]
            serial += 1
            event = {"id": f"e{serial}", "customer": cid, "type": kind}
            if kind == "purchase":
                event["amount"] = round(rng.uniform(5, 200), 2)
                event["sku"] = "diapers-x" if rng.random() < 0.3 else "other"
            elif kind == "delivery":
                event["delay_days"] = rng.choice((0, 0, 0, 1, 2, 3, 5, 9))
            elif kind in ("complaint", "ticket_resolved"):
                event["ticket_id"] = f"t{c}-{rng.randint(0, 2)}"
            elif kind == "review":
                event["text"] = "Very good product, fast delivery and kind support."
            elif kind == "rating":
                event["rating"] = rng.randint(1, 5)
            elif kind == "page_view":
                event["page"] = rng.choice(("home", "product", "cancel"))
            rows.append((t, event))
            t += rng.expovariate(1.0 / (SPAN / (per_customer * 2)))
    rows.sort(key=lambda r: r[0])
    for t, event in rows:
        event["at"] = (START + timedelta(seconds=t)).isoformat()
    return [e for _, e in rows]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_tick(engine: Engine, due_wanted: int) -> tuple[float, int, int]:
    """Tick at the time by which ``due_wanted`` customers are due; (seconds, due,
    decisions)."""
    changes = sorted(c for c in (engine.next_change(c) for c in engine.customers())
                     if c < math.inf)
    now = changes[min(len(changes), due_wanted) - 1]
    due = sum(1 for c in changes if c <= now)
    gc.collect()
    started = time.perf_counter()
    made = engine.tick(from_seconds(now))
    return time.perf_counter() - started, due, len(made)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--tick-customers", type=int, default=1_000_000,
                        help="customers of the second tick measurement")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    per = args.events / args.customers
    events = generate(args.customers, per, args.seed)
    print(f"generated {len(events):,} events for {args.customers:,} customers")
    gc.collect()
    gc.freeze()  # the generated input is not the engine's to scan

    one_by_one = Engine.from_path(RULES)
    started = time.perf_counter()
    for event in events:
        one_by_one.process(event)
    elapsed = time.perf_counter() - started
    print(f"process, one call per event: {len(events):,} events in {elapsed:.2f} s = "
          f"{len(events) / elapsed:,.0f} events/s")
    del one_by_one
    gc.collect()

    engine = Engine.from_path(RULES)
    started = time.perf_counter()
    for start in range(0, len(events), 10_000):
        engine.process_many(events[start:start + 10_000])
    elapsed = time.perf_counter() - started
    print(f"process_many, batches of 10,000: {len(events):,} events in {elapsed:.2f} s = "
          f"{len(events) / elapsed:,.0f} events/s")
    print(f"memory after processing (max RSS): {peak_mb():,.0f} MB")
    due_wanted = args.customers // 100
    seconds, due, made = time_tick(engine, due_wanted)
    print(f"tick with {args.customers:,} customers: {due:,} due, {made:,} decisions, "
          f"{seconds * 1000:.1f} ms")
    small_tick = seconds
    del events, engine
    gc.unfreeze()
    gc.collect()

    big = Engine.from_path(RULES)
    big.process_many(generate(args.tick_customers, 1.5, args.seed + 1))
    seconds, due, made = time_tick(big, due_wanted)
    print(f"tick with {args.tick_customers:,} customers: {due:,} due, {made:,} decisions, "
          f"{seconds * 1000:.1f} ms")
    ratio = seconds / small_tick if small_tick else math.inf
    print(f"tick time ratio ({args.tick_customers // args.customers}x the customers, "
          f"same due): {ratio:.2f} (must stay under 3)")
    print(f"peak memory (max RSS): {peak_mb():,.0f} MB")
    if ratio >= 3:
        sys.exit("the tick time ratio is not under 3: tick does not cost what is due alone")


if __name__ == "__main__":
    main()
