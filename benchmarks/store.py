"""Cost of the SQLite store: ingest against raw inserts, tick with a million customers.

    python benchmarks/store.py                  # 300,000 events; tick with 1,000,000 stored
    python benchmarks/store.py --events 50000 --customers 5000 --tick-customers 100000

Prints, on the same generated events (benchmarks/engine.py's generator, retail
rules): the throughput of a raw sqlite-utils ``insert_all`` of the event rows
alone (the same columns, primary key and index as the store's event log: the
floor of what storage costs here), the throughput of ``StoredEngine.ingest``
(called once per tenth of the events, so a transaction holds a tenth or
``--batch`` events, whichever is fewer), their ratio, the resident memory at
every tenth of the ingest (flat: only the batch's customers are in memory),
the time of a ``tick`` in a database of N stored customers of which 1% are
due, the time of ``at_risk`` there (at the tick's moment and at the latest event,
with how many customers it read, against reading every snapshot once), and
the peak memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlite_utils
from engine import RULES, generate

from retention import Engine
from retention.store import BATCH


def rss_mb() -> float:
    """Resident memory now (Linux), in MB."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 1e6


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def raw_insert(events: list[dict], path: Path) -> float:
    """Events per second of sqlite-utils inserting the event rows alone."""
    db = sqlite_utils.Database(path)
    db.enable_wal()
    db.execute("PRAGMA synchronous=NORMAL")
    db["events"].create({"source": str, "id": str, "customer": str, "type": str, "at": str,
                         "ts": float, "props": str}, pk=("source", "id"))
    db["events"].create_index(["customer", "ts"])
    core = {"id", "customer", "type", "at", "source"}
    started = time.perf_counter()
    rows = ({"source": e.get("source", ""), "id": e["id"], "customer": e["customer"],
             "type": e["type"], "at": e["at"], "ts": 0.0,
             "props": json.dumps({k: v for k, v in e.items() if k not in core})}
            for e in events)
    db["events"].insert_all(rows, batch_size=1000)
    elapsed = time.perf_counter() - started
    db.close()
    return len(events) / elapsed


def ingest(events: list[dict], path: Path, batch: int, marks: int = 10
           ) -> tuple[float, list[float]]:
    """Events per second of the store's ingest, and the memory at each tenth."""
    engine = Engine.open(path, rules=RULES, batch_size=batch)
    step = max(1, len(events) // marks)
    memory: list[float] = []
    started = time.perf_counter()
    for start in range(0, len(events), step):
        engine.ingest(events[start:start + step])
        memory.append(rss_mb())
    elapsed = time.perf_counter() - started
    engine.close()
    return len(events) / elapsed, memory


def tick_with(customers: int, folder: Path, seed: int) -> None:
    """A database of ``customers`` stored customers, then a tick that finds 1% due."""
    path = folder / "big.db"
    engine = Engine.open(path, rules=RULES)
    started = time.perf_counter()
    chunk = 100_000
    memory: list[float] = []
    for first in range(0, customers, chunk):
        part = generate(min(chunk, customers - first), 1.0, seed + first)
        for event in part:  # distinct customers and ids per chunk
            event["customer"] = f"b{first}-{event['customer']}"
            event["id"] = f"b{first}-{event['id']}"
        engine.ingest(part)
        del part
        memory.append(rss_mb())
    stored = engine.db.execute("SELECT count(*) FROM customers").fetchone()[0]
    print(f"stored {stored:,} customers in {time.perf_counter() - started:.0f} s; memory "
          f"after each {chunk:,} (MB): " + " ".join(f"{m:,.0f}" for m in memory))
    due_wanted = max(1, stored // 100)
    row = engine.db.execute(
        "SELECT next_change_at FROM customers WHERE next_change_at IS NOT NULL"
        " ORDER BY next_change_at LIMIT 1 OFFSET ?", [due_wanted - 1]).fetchone()
    from retention.times import from_seconds
    now = from_seconds(row[0])
    gc.collect()
    started = time.perf_counter()
    made = engine.tick(now)
    elapsed = time.perf_counter() - started
    print(f"tick with {stored:,} stored customers, {due_wanted:,} due: {len(made):,} decisions "
          f"in {elapsed * 1000:,.0f} ms")
    at_risk_with(engine, stored, now)
    engine.close()


def at_risk_with(engine: Engine, stored: int, tick_moment: datetime) -> None:
    """``at_risk`` at the tick's moment (customers with later events are replayed to
    it) and at the latest event stored, with how many customers it read, against
    reading every customer's snapshot once (what a listing that looked at all
    customers would cost at the least)."""
    from retention.times import from_seconds

    started = time.perf_counter()
    total = engine.db.execute("SELECT sum(length(state)) FROM customers").fetchone()[0]
    scan = time.perf_counter() - started
    print(f"yardstick: reading all {stored:,} snapshots ({total / 1e6:,.0f} MB) "
          f"in {scan * 1000:,.0f} ms")
    latest = engine.db.execute("SELECT max(last_ts) FROM customers").fetchone()[0]
    for moment in (tick_moment, from_seconds(latest)):
        t = moment.timestamp()
        levelled, due, later = engine.db.execute(
            "SELECT count(*) FILTER (WHERE level IS NOT NULL),"
            " count(*) FILTER (WHERE level IS NULL AND next_change_at <= ?),"
            " count(*) FILTER (WHERE level IS NULL AND NOT next_change_at <= ? AND last_ts > ?)"
            " FROM customers WHERE opened_at <= ?", [t, t, t, t]).fetchone()
        started = time.perf_counter()
        rows = engine.at_risk(now=moment)
        elapsed = time.perf_counter() - started
        read = levelled + due + later
        print(f"at-risk at {moment.date()} with {stored:,} stored customers: {len(rows):,} "
              f"listed, {read:,} read ({levelled:,} in a level, {due:,} due, {later:,} with "
              f"later events), in {elapsed * 1000:,.0f} ms ({elapsed / scan:.1f} yardsticks; "
              f"{elapsed / max(1, read) * 1e6:,.0f} us a customer read)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--customers", type=int, default=30_000)
    parser.add_argument("--tick-customers", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=BATCH, help="events per transaction")
    args = parser.parse_args()

    events = generate(args.customers, args.events / args.customers, args.seed)
    print(f"generated {len(events):,} events for {args.customers:,} customers")
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory() as folder:
        raw = raw_insert(events, Path(folder) / "raw.db")
        print(f"raw sqlite-utils insert of the event rows: {raw:,.0f} events/s")
        rate, memory = ingest(events, Path(folder) / "store.db", args.batch)
        per = min(args.batch, max(1, len(events) // 10))
        print(f"retention ingest (retail rules, {per:,} events per transaction): "
              f"{rate:,.0f} events/s")
        print(f"ingest / raw insert: {rate / raw:.0%}")
        print("memory at each tenth of the ingest (MB): "
              + " ".join(f"{m:,.0f}" for m in memory)
              + f" (growth from the first tenth: {memory[-1] - memory[0]:+,.0f} MB)")
        del events
        gc.unfreeze()
        gc.collect()
        tick_with(args.tick_customers, Path(folder), args.seed + 1)
    print(f"peak memory (max RSS): {peak_mb():,.0f} MB")


if __name__ == "__main__":
    main()
