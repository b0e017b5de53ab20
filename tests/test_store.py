"""The SQLite store (docs/store.md): real files under tmp_path, no mocks.

The store must mean what the in-memory engine means: the same events and rules
give the same capital, ledger and decisions, whatever the batches and the order
of ingestion, and a batch lands whole or not at all.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import sqlite3
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retention import Engine, EventError, RuleFileError, load_rules, load_texts
from retention.rules.model import RuleSet
from retention.store import Incoming, StoredEngine, StoreError, schema_version

from .strategies import event_streams, rule_files

ROOT = Path(__file__).resolve().parent.parent
RETAIL = ROOT / "examples" / "rules" / "retail.yaml"
EVENTS = ROOT / "examples" / "events" / "retail.jsonl"
START = datetime(2026, 1, 1, tzinfo=UTC)

#: a level at 40 that an incident crosses and a gift keeps away
SIMPLE = """
capital: {initial: 50, min: 0, max: 100}
rules:
  gift: {when: event.type == "gift", points: 20}
  incident: {when: event.type == "incident", points: -15}
  review: {when: event.type == "review", points: 2, then: [thanks]}
levels:
  - {name: watch, below: 40, then: [flag]}
actions:
  flag: {kind: service, via: crm_tag}
  thanks: {kind: marketing, via: email}
"""


def retail_events(count: int = 3000) -> list[dict]:
    with EVENTS.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in itertools.islice(lines, count)]


def event(event_id: str, customer: str, kind: str, day: float, **props) -> dict:
    return {"id": event_id, "customer": customer, "type": kind,
            "at": (START + timedelta(days=day)).isoformat(), **props}


def memory_engine(rules, events) -> Engine:
    engine = Engine(rules if not isinstance(rules, str | Path) else load_rules(rules))
    for ev in events:
        engine.process(ev)
    return engine


def simple_rules(tmp_path: Path, text: str = SIMPLE) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def tables(store: StoredEngine) -> list[str]:
    return [name for (name,) in store.db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]


def dump(store: StoredEngine, *, skip: dict[str, tuple[str, ...]] | None = None) -> dict:
    """Every row of every table, all columns except those named in ``skip``."""
    skip = skip or {}
    found = {}
    for table in tables(store):
        columns = [row[1] for row in store.db.execute(f"PRAGMA table_info([{table}])")
                   if row[1] not in skip.get(table, ())]
        names = ", ".join(f"[{c}]" for c in columns)
        found[table] = sorted(store.db.execute(f"SELECT {names} FROM [{table}]").fetchall(),
                              key=repr)
    return found


#: what two databases holding the same data may still differ in: the wall-clock time
#: of an operation, and the encoding of a snapshot (marshal's back-references depend
#: on how objects were shared in memory; ``later_capitals`` checks what it holds)
ENCODING = {"rule_versions": ("used_from",), "dead_letters": ("received_at",),
            "customers": ("state",)}
LATER = "2027-01-01T00:00:00+00:00"


def later_capitals(store: StoredEngine) -> dict[str, float | None]:
    """Capital of every customer at a time after all events: read from the snapshot."""
    return {c: store.capital(c, at=LATER) for c in store.customers()}


def counts(store: StoredEngine) -> dict[str, int]:
    return {table: store.db.execute(f"SELECT count(*) FROM [{table}]").fetchone()[0]
            for table in tables(store)}


def same_database(store: StoredEngine) -> dict:
    """What must not depend on batches, order or repeats (the encoded state blob
    aside)."""
    db = store.db
    ledgers = [cid for (cid,) in db.execute("SELECT DISTINCT customer FROM ledger")]
    return {
        "events": db.execute("SELECT source, id, customer, type, at, ts, props FROM events"
                             " ORDER BY source, id").fetchall(),
        "customers": db.execute(
            "SELECT id, opened_at, level, capital, last_ts, next_change_at FROM customers"
            " ORDER BY id").fetchall(),
        "ledger": {cid: db.execute(
            "SELECT customer, ts, at, rule, points, event_id, category, reason FROM ledger"
            " WHERE customer = ? ORDER BY seq", [cid]).fetchall() for cid in ledgers},
        "decisions": db.execute(
            "SELECT * FROM decisions ORDER BY id").fetchall(),
    }


# -- opening ------------------------------------------------------------------------------


def test_a_new_file_is_created_in_wal_mode_and_migrated(tmp_path):
    path = tmp_path / "new.db"
    with Engine.open(path, rules=RETAIL) as store:
        assert isinstance(store, StoredEngine)
    assert path.exists()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema_version()
        names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    assert {"events", "customers", "ledger", "decisions", "aliases", "rule_versions",
            "dead_letters"} <= names


def test_reopening_keeps_the_data_and_the_rules(tmp_path):
    path = tmp_path / "r.db"
    events = retail_events(300)
    with Engine.open(path, rules=RETAIL) as store:
        store.ingest(events)
        before = dump(store)
        capitals = {c: store.capital(c) for c in store.customers()}
    assert len(capitals) > 10
    with Engine.open(path) as store:  # rules=None: the version the database last used
        assert dump(store) == before
        assert {c: store.capital(c) for c in store.customers()} == capitals
        assert store.ingest(events).duplicates == len(events)


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "newer.db"
    Engine.open(path, rules=RETAIL).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {schema_version() + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Engine.open(path, rules=RETAIL)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema_version() + 1
    conn.close()


@pytest.mark.parametrize("size", [20, 5000])
def test_a_file_that_is_not_sqlite_is_refused_and_left_as_it_was(tmp_path, size):
    path = tmp_path / "notes.db"
    rng = random.Random(size)
    text = "".join(rng.choice("abcdefghij klmnop\n") for _ in range(size)).encode()
    path.write_bytes(text)
    with pytest.raises(StoreError, match="not a SQLite database"):
        Engine.open(path, rules=RETAIL)
    assert path.read_bytes() == text
    assert [p.name for p in tmp_path.iterdir()] == ["notes.db"]


def test_a_sqlite_database_of_something_else_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a retention one"):
        Engine.open(path, rules=RETAIL)
    conn = sqlite3.connect(path)
    try:
        assert [n for (n,) in conn.execute("SELECT name FROM sqlite_master")] == ["invoices"]
        assert conn.execute("SELECT total FROM invoices").fetchall() == [(12.5,)]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    finally:
        conn.close()


def test_refusing_a_sqlite_database_of_something_else_leaves_its_file_as_it_was(tmp_path):
    """Opening someone else's database by mistake must not convert it to WAL."""
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.commit()
    conn.close()
    original = path.read_bytes()
    with pytest.raises(StoreError):
        Engine.open(path, rules=RETAIL)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_a_read_only_folder_gives_a_store_error(read_only_folder):
    with pytest.raises(StoreError) as caught:
        Engine.open(read_only_folder / "r.db", rules=RETAIL)
    assert str(caught.value).startswith(str(read_only_folder / "r.db"))
    assert f"the folder {read_only_folder} is not writable" in str(caught.value)
    assert not isinstance(caught.value, sqlite3.Error)


def test_a_missing_folder_gives_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Engine.open(tmp_path / "nowhere" / "r.db", rules=RETAIL)
    assert not (tmp_path / "nowhere").exists()


def test_a_new_database_without_rules_is_refused(tmp_path):
    with pytest.raises(StoreError, match="no rules"):
        Engine.open(tmp_path / "r.db")


# -- ingestion equals the in-memory engine ---------------------------------------------


def test_ingesting_gives_what_the_in_memory_engine_gives(tmp_path):
    events = retail_events()
    memory = memory_engine(RETAIL, events)
    with Engine.open(tmp_path / "r.db", rules=RETAIL) as store:
        report = store.ingest(events)
        assert (report.ingested, report.duplicates, report.dead_lettered) == (len(events), 0, 0)
        customers = sorted(memory.customers())
        assert sorted(store.customers()) == customers
        for c in customers:
            assert store.capital(c) == memory.capital(c), c
            assert store.level(c) == memory.level(c), c
            assert [e.to_dict() for e in store.explain(c)] == \
                [e.to_dict() for e in memory.explain(c)], c
        stored = sorted((d.to_dict() for d in store.decisions()), key=lambda d: d["id"])
        made = sorted((d.to_dict() for d in memory.decisions()), key=lambda d: d["id"])
        assert len(made) > 20  # the slice exercises levels and recognition
        assert stored == made
        assert report.decisions == len(made)
        assert store.db.execute("SELECT count(*) FROM events").fetchone()[0] == len(events)


def test_small_batches_give_what_one_batch_gives(tmp_path):
    events = retail_events(1500)
    with Engine.open(tmp_path / "one.db", rules=RETAIL) as one, \
            Engine.open(tmp_path / "many.db", rules=RETAIL, batch_size=97) as many:
        one.ingest(events)
        many.ingest(events)
        assert dump(many, skip=ENCODING) == dump(one, skip=ENCODING)
        assert later_capitals(many) == later_capitals(one)


# -- a batch is atomic ------------------------------------------------------------------


def test_a_batch_that_fails_half_way_leaves_nothing_and_can_be_ingested_again(
        tmp_path, monkeypatch):
    events = retail_events()
    # the held-back events come late for customers already stored: recomputations
    first = [e for i, e in enumerate(events) if i % 7 != 3]
    # with a dead letter and a merge of two stored customers
    late = [*events[3::7], {"id": "no-time", "customer": "c-0001", "type": "purchase"},
            {"type": "identify", "customer": first[0]["customer"],
             "aliases": [first[1]["customer"]]}]
    with Engine.open(tmp_path / "clean.db", rules=RETAIL) as clean:
        clean.ingest(first)
        clean_second = clean.ingest(late)
        expected = dump(clean, skip=ENCODING)
        expected_later = later_capitals(clean)
    assert (clean_second.ingested, clean_second.dead_lettered, clean_second.merged) == \
        (len(late) - 2, 1, 1)
    assert clean_second.decisions > 0

    with Engine.open(tmp_path / "r.db", rules=RETAIL) as store:
        store.ingest(first)
        before = dump(store)
        counted = counts(store)
        real_save = StoredEngine._save
        written = []  # what the transaction held when it failed

        def failing_save(self, *args, **kwargs):
            if not written:
                written.append(counts(self))
                raise RuntimeError("disk on fire")
            return real_save(self, *args, **kwargs)

        monkeypatch.setattr(StoredEngine, "_save", failing_save)
        with pytest.raises(RuntimeError, match="disk on fire"):
            store.ingest(late)
        assert written[0]["events"] == counted["events"] + len(late) - 2
        assert written[0]["ledger"] > counted["ledger"]
        assert counts(store) == counted
        assert dump(store) == before

        report = store.ingest(late)
        assert (report.ingested, report.duplicates, report.merged) == (len(late) - 2, 0, 1)
        assert report.decisions == clean_second.decisions
        assert dump(store, skip=ENCODING) == expected
        assert later_capitals(store) == expected_later


# -- duplicates ----------------------------------------------------------------------------


def test_ingesting_the_same_events_again_changes_nothing(tmp_path):
    events = retail_events(1200)
    with Engine.open(tmp_path / "r.db", rules=RETAIL) as store:
        first = store.ingest(events)
        assert first.ingested == len(events)
        before = dump(store)
        again = store.ingest(events)
        assert (again.ingested, again.duplicates, again.decisions) == (0, len(events), 0)
        assert dump(store) == before
        # and in another order, as single-event batches
        shuffled = list(events[:200])
        random.Random(7).shuffle(shuffled)
        for ev in shuffled:
            assert store.ingest([ev]).duplicates == 1
        assert dump(store) == before


def test_a_repeat_inside_one_batch_counts_once(tmp_path):
    events = retail_events(200)
    with Engine.open(tmp_path / "once.db", rules=RETAIL) as once, \
            Engine.open(tmp_path / "twice.db", rules=RETAIL) as twice:
        once.ingest(events)
        report = twice.ingest(events + events[:50])
        assert (report.ingested, report.duplicates) == (len(events), 50)
        assert dump(twice, skip=ENCODING) == dump(once, skip=ENCODING)
        assert later_capitals(twice) == later_capitals(once)


# -- any batches, any order, repeats: the same database --------------------------------


@st.composite
def deliveries(draw, events: list[dict]) -> list[list[dict]]:
    """The events with some repeated, in any order, cut into batches."""
    repeats = draw(st.lists(st.sampled_from(events), max_size=6))
    shuffled = draw(st.permutations(events + repeats))
    sizes = draw(st.lists(st.integers(1, 8), min_size=1, max_size=len(shuffled)))
    batches, at = [], 0
    for size in itertools.cycle(sizes):
        if at >= len(shuffled):
            break
        batches.append(shuffled[at:at + size])
        at += size
    return batches


@functools.lru_cache(maxsize=16)
def generated_rules(text: str) -> RuleSet:
    """Rules parsed once per text: shrinking runs the same text many times, and the
    parse is half the cost of an example (a RuleSet is frozen, safe to share)."""
    return load_texts([("generated.yaml", text)])


@given(rule_files(), event_streams(max_size=20), st.data())
def test_any_batches_order_and_repeats_give_the_same_database(text, events, data):
    batches = data.draw(deliveries(events))
    rules = generated_rules(text)
    with tempfile.TemporaryDirectory() as folder, \
            StoredEngine(Path(folder) / "sorted.db", rules) as reference, \
            StoredEngine(Path(folder) / "any.db", rules) as store:
        reference.ingest(sorted(events, key=lambda e: e["at"]))
        ingested = duplicates = 0
        for batch in batches:
            report = store.ingest(batch)
            ingested += report.ingested
            duplicates += report.duplicates
            assert report.dead_lettered == 0
        assert ingested == len(events)
        assert duplicates == sum(map(len, batches)) - len(events)
        got, expected = same_database(store), same_database(reference)
        assert got["events"] == expected["events"]
        assert got["ledger"] == expected["ledger"]
        assert got["decisions"] == expected["decisions"]
        assert [row[:5] for row in got["customers"]] == \
            [row[:5] for row in expected["customers"]]
        assert later_capitals(store) == later_capitals(reference)
        # next_change_at last: a schedule that differs is a distinct failure
        assert got["customers"] == expected["customers"]


def test_a_fading_incident_recovered_in_a_later_batch_is_refunded(tmp_path):
    """The customer comes back from their snapshot between the batches: the incident
    it recovers is found again, still fading, and refunded as in one batch."""
    rules = simple_rules(tmp_path, """
capital: {initial: 70, min: 0, max: 100}
rules:
  late: {when: event.type == "late", points: -20, fades_over: 30d, category: incident}
  fixed: {when: event.type == "fixed", recovers: late, match: ticket, within: 7d,
          refund: 0.5, category: recovery}
""")
    events = [event("p", "c", "purchase", 0), event("l", "c", "late", 1, ticket="t1"),
              event("f", "c", "fixed", 3, ticket="t1")]
    with Engine.open(tmp_path / "one.db", rules=rules) as one, \
            Engine.open(tmp_path / "two.db", rules=rules) as two:
        one.ingest(events)
        two.ingest(events[:2])
        two.ingest(events[2:])
        assert [(e.rule, e.category) for e in two.explain("c")] == [
            ("opening", "opening"), ("late", "incident"), ("late", "fading"),
            ("fixed", "recovery")]
        assert same_database(two) == same_database(one)
        assert later_capitals(two) == later_capitals(one)


# -- late events ----------------------------------------------------------------------------


def test_a_late_event_recomputes_the_customer_and_drops_what_it_no_longer_makes(
        tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([event("p", "c1", "purchase", 1), event("b", "c1", "incident", 3)])
        assert store.capital("c1") == 35
        assert store.level("c1") == "watch"
        [fired] = store.decisions("c1")
        assert (fired.rule, fired.action, fired.status) == ("watch", "flag", "pending")

        report = store.ingest([event("a", "c1", "gift", 2)])  # earlier than "b"
        assert report.ingested == 1
        assert store.capital("c1") == 55
        assert store.level("c1") is None
        ledger = store.explain("c1")
        assert [(e.rule, e.points, e.event_id) for e in ledger] == [
            ("opening", 50, "p"), ("gift", 20, "a"), ("incident", -15, "b")]
        rows = store.db.execute(
            "SELECT event_id FROM ledger WHERE customer = 'c1' ORDER BY seq").fetchall()
        assert rows == [("p",), ("a",), ("b",)]
        assert store.decisions("c1") == []  # undelivered: it leaves the outbox
        memory = memory_engine(load_texts([("r.yaml", SIMPLE)]), [
            event("p", "c1", "purchase", 1), event("a", "c1", "gift", 2),
            event("b", "c1", "incident", 3)])
        assert [e.to_dict() for e in ledger] == [e.to_dict() for e in memory.explain("c1")]
        assert memory.decisions("c1") == []


def test_a_dropped_decision_comes_back_when_the_history_makes_it_again(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([event("p", "c1", "purchase", 1), event("b", "c1", "incident", 5)])
        [fired] = store.decisions("c1")
        store.ingest([event("a", "c1", "gift", 2)])  # 50 + 20 - 15 = 55 at "b"
        assert store.decisions("c1") == []
        store.ingest([event("x", "c1", "incident", 3)])  # 40 at "b": not below 40
        assert store.decisions("c1") == []
        store.ingest([event("y", "c1", "incident", 4)])  # 40 at "y", 25 at "b": fires at "b"
        assert [(d.id, d.status, d.reason) for d in store.decisions("c1")] == [
            (fired.id, "pending", None)]
        assert store.capital("c1") == 25


EVERY_PURCHASE = """
capital: {initial: 50, min: 0, max: 100}
rules: {}
recognition:
  every_purchase: {every: 1, when: event.type == "purchase", then: [discount]}
actions:
  discount: {kind: in_purchase}
"""


def test_a_late_event_updates_what_an_undelivered_decision_says(tmp_path):
    """The discount on the second purchase says it is the second, whatever came first."""
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path, EVERY_PURCHASE)) as store:
        store.ingest([event("second", "c1", "purchase", 2)])
        store.ingest([event("first", "c1", "purchase", 1)])
        stored = {d.trigger: dict(d.params) for d in store.decisions("c1")}
        in_order = memory_engine(load_texts([("r.yaml", EVERY_PURCHASE)]), [
            event("first", "c1", "purchase", 1), event("second", "c1", "purchase", 2)])
        assert {d.trigger: dict(d.params) for d in in_order.decisions("c1")} == \
            {"first": {"count": 1}, "second": {"count": 2}}
        assert stored == {"first": {"count": 1}, "second": {"count": 2}}


def test_the_schedule_does_not_depend_on_the_order_of_ingestion(tmp_path):
    rules = simple_rules(tmp_path, """
capital: {initial: 10, min: 0, max: 60}
rules:
  late: {when: event.type == "late", points: -3, fades_over: 20d}
silence: {after: 2d, rate_per_day: 0.5}
levels:
  - {name: watch, below: 5, then: [flag]}
actions:
  flag: {kind: service, via: crm_tag}
""")
    events = [event("p", "c1", "purchase", 0), event("l", "c1", "late", 1),
              event("x", "c1", "ping", 2)]
    with Engine.open(tmp_path / "sorted.db", rules=rules) as in_order, \
            Engine.open(tmp_path / "late.db", rules=rules) as late:
        in_order.ingest(events)
        for ev in (events[0], events[2], events[1]):
            late.ingest([ev])
        assert late.capital("c1") == in_order.capital("c1")
        assert late.next_change("c1") == in_order.next_change("c1")


def test_a_delivered_decision_is_never_dropped(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([event("p", "c1", "purchase", 1), event("b", "c1", "incident", 3)])
        [fired] = store.decisions("c1")
        store.db.execute("UPDATE decisions SET status = 'sent' WHERE id = ?", [fired.id])
        store.ingest([event("a", "c1", "gift", 2)])
        assert [(d.id, d.status) for d in store.decisions("c1")] == [(fired.id, "sent")]


# -- identity ----------------------------------------------------------------------------


def test_events_under_an_alias_land_on_the_customer(tmp_path):
    alias = "email:ann@example.com"
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        report = store.ingest([{"type": "identify", "customer": "c1", "aliases": [alias]}])
        assert report.identified == 1 and report.dead_lettered == 0
        assert store.resolve(alias) == "c1"
        store.ingest([event("p", alias, "purchase", 1), event("g", alias, "gift", 2),
                      event("i", "c1", "incident", 3)])
        assert list(store.customers()) == ["c1"]
        assert store.capital("c1") == store.capital(alias) == 55
        assert [e.event_id for e in store.explain("c1")] == ["p", "g", "i"]
        assert {e.customer for e in store.explain(alias)} == {"c1"}
        assert store.db.execute("SELECT DISTINCT customer FROM events").fetchall() == [("c1",)]
        assert store.identifiers(alias) == ["c1", alias]


def test_identify_then_events_in_the_same_batch(tmp_path):
    alias = "email:ann@example.com"
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([{"type": "identify", "customer": "c1", "aliases": [alias]},
                      event("p", alias, "purchase", 1), event("g", alias, "gift", 2)])
        assert list(store.customers()) == ["c1"]
        assert store.capital("c1") == 70
        assert store.db.execute("SELECT DISTINCT customer FROM events").fetchall() == [("c1",)]


C1 = [event("c1-p", "c1", "purchase", 0), event("c1-g", "c1", "gift", 4)]
C2 = [event("c2-p", "c2", "purchase", 1), event("c2-r", "c2", "review", 2),
      event("c2-i", "c2", "incident", 3), event("c2-j", "c2", "incident", 5)]


def test_merging_two_customers_replays_both_histories_as_one(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest(C2)
        store.ingest(C1)
        before = {d.id: d for d in store.decisions("c2")}
        assert {(d.rule, d.action) for d in before.values()} == {
            ("review", "thanks"), ("watch", "flag")}

        report = store.ingest([{"type": "identify", "customer": "c1", "aliases": ["c2"]}])
        assert (report.identified, report.merged) == (1, 1)

        memory = memory_engine(load_texts([("r.yaml", SIMPLE)]), sorted(
            [{**e, "customer": "c1"} for e in C1 + C2], key=lambda e: e["at"]))
        assert list(store.customers()) == ["c1"]
        assert store.resolve("c2") == "c1"
        assert store.capital("c1") == memory.capital("c1")
        assert store.level("c1") == memory.level("c1")
        assert [e.to_dict() for e in store.explain("c1")] == \
            [e.to_dict() for e in memory.explain("c1")]
        assert store.db.execute(
            "SELECT count(*) FROM customers WHERE id = 'c2'").fetchone()[0] == 0
        assert store.db.execute(
            "SELECT count(*) FROM ledger WHERE customer = 'c2'").fetchone()[0] == 0
        assert store.db.execute(
            "SELECT DISTINCT customer FROM events").fetchall() == [("c1",)]

        after = store.decisions("c1")
        assert set(before) <= {d.id for d in after}
        assert all(d.customer == "c1" for d in after)
        assert store.db.execute(
            "SELECT count(*) FROM decisions WHERE customer = 'c2'").fetchone()[0] == 0
        causes = [(d.rule, d.trigger, d.action) for d in after]
        assert len(causes) == len(set(causes))
        assert sorted(causes) == \
            sorted((d.rule, d.trigger, d.action) for d in memory.decisions("c1"))

        # events still sent under the old id land on the merged customer
        store.ingest([event("c2-late", "c2", "gift", 6)])
        assert list(store.customers()) == ["c1"]
        assert store.capital("c1") == memory.capital("c1") + 20


def test_a_merge_that_undoes_a_level_drops_its_undelivered_decision(
        tmp_path):
    c1 = [event("c1-p", "c1", "purchase", 0), event("c1-g", "c1", "gift", 2)]
    c2 = [event("c2-p", "c2", "purchase", 1), event("c2-i", "c2", "incident", 3)]
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest(c1 + c2)
        [fired] = store.decisions("c2")
        assert fired.rule == "watch"
        store.ingest([{"type": "identify", "customer": "c1", "aliases": ["c2"]}])
        assert store.capital("c1") == 55  # 50 + 20 - 15: the level never crossed
        assert store.level("c1") is None
        rows = store.db.execute("SELECT id, customer, status FROM decisions").fetchall()
        assert rows == []


def test_merging_in_the_same_batch_as_the_histories(tmp_path):
    with Engine.open(tmp_path / "one.db", rules=simple_rules(tmp_path)) as one:
        one.ingest(C2 + C1 + [{"type": "identify", "customer": "c1", "aliases": ["c2"]}])
        memory = memory_engine(load_texts([("r.yaml", SIMPLE)]), sorted(
            [{**e, "customer": "c1"} for e in C1 + C2], key=lambda e: e["at"]))
        assert list(one.customers()) == ["c1"]
        assert one.capital("c1") == memory.capital("c1")
        assert [e.to_dict() for e in one.explain("c1")] == \
            [e.to_dict() for e in memory.explain("c1")]
        assert one.db.execute("SELECT DISTINCT customer FROM events").fetchall() == [("c1",)]
        assert one.db.execute(
            "SELECT count(*) FROM decisions WHERE customer = 'c2'").fetchone()[0] == 0


def test_an_identify_that_does_not_move_aliases_leaves_another_customers_links(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([*C1, *C2, {"type": "identify", "customer": "c1", "aliases": ["shop:1"]}])
        # shop:1 names c1: c2 cannot take it (nor c1's history) without moving it
        report = store.ingest([{"type": "identify", "customer": "c2",
                                "aliases": ["shop:1", "shop:2", "c3"],
                                "move_aliases": False},
                               event("c3-p", "c3", "purchase", 6)])
        assert report.dead_lettered == 0
        assert store.resolve("shop:1") == "c1" and store.resolve("shop:2") == "c2"
        assert store.resolve("c3") == "c2"  # a new identifier is linked as ever
        assert store.capital("c1") == 70
        # with it (the default), the alias moves, with c1 and its history
        store.ingest([{"type": "identify", "customer": "c2", "aliases": ["shop:1"]}])
        assert store.resolve("shop:1") == store.resolve("c1") == "c2"
        assert list(store.customers()) == ["c2"]


@pytest.mark.parametrize("request_", [
    {"type": "identify", "customer": "c1", "aliases": "email:ann@example.com"},
    {"type": "identify", "customer": "c1", "aliases": [""]},
    {"type": "identify", "aliases": ["email:ann@example.com"]},
    {"type": "identify", "customer": "c1", "aliases": ["email:ann@example.com"],
     "move_aliases": "no"},
])
def test_a_bad_identify_is_dead_lettered_with_its_reason(tmp_path, request_):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        report = store.ingest([request_])
        assert (report.identified, report.dead_lettered) == (0, 1)
        [letter] = store.dead_letters()
        field = ("move_aliases" if "move_aliases" in request_ else "aliases"
                 if "customer" in request_ else "customer")
        assert f"'{field}'" in letter["reason"]
        assert json.loads(letter["raw"]) == request_
        assert report.problems == [f"api: {letter['reason']}"]
        assert store.db.execute("SELECT count(*) FROM aliases").fetchone()[0] == 0
        assert store.resolve("email:ann@example.com") == "email:ann@example.com"


def test_identify_through_process_is_refused(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store, \
            pytest.raises(EventError, match="ingest"):
        store.process({"type": "identify", "customer": "c1", "aliases": ["c2"]})


# -- privacy -----------------------------------------------------------------------------

WHO = "cust-zq81x"
EMAIL = "email:zq81x@example.com"


def database_bytes(path: Path) -> bytes:
    """The file and whatever SQLite keeps beside it (-wal, -shm, -journal)."""
    return b"".join(p.read_bytes() for p in sorted(path.parent.iterdir())
                    if p.name.startswith(path.name))


def test_forget_leaves_no_identifier_in_the_file(tmp_path):
    path = tmp_path / "r.db"
    with Engine.open(path, rules=RETAIL) as store:
        store.ingest(retail_events(500))
        store.ingest([{"type": "identify", "customer": WHO, "aliases": [EMAIL]}])
        mine = [
            {"id": "zq81x-1", "customer": WHO, "type": "purchase",
             "at": "2025-02-01T10:00:00+00:00", "amount": 30, "note": "zq81x's first order"},
            {"id": "zq81x-2", "customer": EMAIL, "type": "billing_error",
             "at": "2025-02-03T10:00:00+00:00"},
            {"id": "zq81x-3", "customer": WHO, "type": "complaint",
             "at": "2025-02-04T10:00:00+00:00", "ticket_id": "zq81x-t"},
            {"id": "zq81x-4", "customer": EMAIL, "type": "review",
             "at": "2025-02-05T10:00:00+00:00", "rating": 5,
             "text": "zq81x says this is a long enough review"},
            {"id": "zq81x-5", "customer": EMAIL, "type": "purchase"},  # no 'at'
        ]
        report = store.ingest(mine)
        assert (report.ingested, report.dead_lettered) == (4, 1)
        decided = store.decisions(WHO)
        assert {d.action for d in decided} >= {"flag_in_crm", "thank_contributor"}
        assert WHO.encode() in database_bytes(path)

        exported = store.export(EMAIL)
        assert json.loads(json.dumps(exported)) == exported
        assert exported["customer"] == WHO
        assert exported["aliases"] == [EMAIL]
        assert [e["id"] for e in exported["events"]] == ["zq81x-1", "zq81x-2", "zq81x-3",
                                                         "zq81x-4"]
        assert exported["events"][0]["note"] == "zq81x's first order"
        assert exported["ledger"] == [e.to_dict() for e in store.explain(WHO)]
        assert len(exported["ledger"]) >= 5
        assert [d["id"] for d in exported["decisions"]] == [d.id for d in decided]
        assert len(exported["dead_letters"]) == 1

        by_action = store.stats()["decisions"]
        others = store.db.execute(
            "SELECT count(*) FROM decisions WHERE customer != ?", [WHO]).fetchone()[0]
        store.forget(EMAIL)

        assert store.stats()["forgotten_customers"] == 1
        assert store.stats()["decisions"] == by_action
        assert store.db.execute(
            "SELECT count(*) FROM decisions WHERE customer IS NULL").fetchone()[0] == \
            len(decided)
        assert store.db.execute(
            "SELECT count(*) FROM decisions WHERE customer != ?", [WHO]).fetchone()[0] == \
            others
        assert store.decisions(WHO) == []
        assert WHO not in store.customers()
        assert store.dead_letters() == []
        assert store.resolve(EMAIL) == EMAIL
        raw = database_bytes(path)
        for secret in (WHO, EMAIL, "zq81x"):
            assert secret.encode() not in raw, secret
            assert secret.encode("utf-16-le") not in raw, secret
    raw = database_bytes(path)
    assert b"zq81x" not in raw


def test_forget_after_a_merge_leaves_no_identifier_of_the_merged_customer(tmp_path):
    other = "cust-yv27k"
    path = tmp_path / "r.db"
    with Engine.open(path, rules=simple_rules(tmp_path)) as store:
        store.ingest([event("p1", WHO, "purchase", 0), event("g1", WHO, "gift", 2),
                      event("p2", other, "purchase", 1), event("i2", other, "incident", 3)])
        assert [d.rule for d in store.decisions(other)] == ["watch"]
        store.ingest([{"type": "identify", "customer": WHO, "aliases": [other, EMAIL]}])
        assert store.resolve(other) == WHO
        store.forget(WHO)
        assert list(store.customers()) == []
        assert store.db.execute(
            "SELECT count(*) FROM decisions WHERE customer IS NOT NULL").fetchone()[0] == 0
        raw = database_bytes(path)
        for secret in (WHO, other, EMAIL):
            assert secret.encode() not in raw, secret


def test_forget_on_a_full_disk_raises_scrub_pending_with_what_it_erased(tmp_path):
    """VACUUM fails (a file-size limit stands for a full disk, in a child process):
    the erasure stays committed and ScrubPending says so, with what was erased; the
    next scrub finishes."""
    import subprocess
    import sys

    pytest.importorskip("resource")
    db = tmp_path / "r.db"
    with Engine.open(db, rules=RETAIL) as store:
        store.ingest(retail_events(6000))
        store.ingest([event("p", WHO, "purchase", 1, amount=3)])
    size = db.stat().st_size
    child = f"""
import json, resource, signal
from retention import Engine
from retention.store import ScrubPending
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 2}, {size // 2}))
with Engine.open({str(db)!r}) as store:
    try:
        store.forget({WHO!r})
    except ScrubPending as exc:
        print(json.dumps({{"erased": exc.erased, "message": str(exc)}}))
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["erased"]["events"] == 1 and report["erased"]["snapshots"] == 1
    assert f"{WHO} is erased (committed), but the file could not be vacuumed" in \
        report["message"]
    with Engine.open(db) as store:
        assert WHO not in store.customers() and store.scrub_pending()
        store.scrub()
        assert not store.scrub_pending()
    assert WHO.encode() not in database_bytes(db)


def test_forgetting_twice_counts_one_customer(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([event("p", WHO, "purchase", 1)])
        store.forget(WHO)
        store.forget(WHO)
        assert store.stats()["forgotten_customers"] == 1


# -- rule versions ----------------------------------------------------------------------


def test_a_broken_rule_file_changes_nothing(tmp_path):
    rules = simple_rules(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text(SIMPLE.replace("points: -15", "pionts: -15"), encoding="utf-8")
    with Engine.open(tmp_path / "r.db", rules=rules) as store:
        store.ingest(C1 + C2)
        before = dump(store)
        versions = store.rule_versions()
        with pytest.raises(RuleFileError, match="pionts"):
            store.use_rules(broken)
        assert store.rule_versions() == versions
        assert dump(store) == before
        assert store.rules.sources[0].text == SIMPLE
        store.ingest([event("late", "c2", "incident", 6)])  # the old rules still apply
        assert [e.points for e in store.explain("c2")][-1] == -15


def test_a_new_rule_version_is_recorded_and_recomputes(tmp_path):
    rules = simple_rules(tmp_path)
    path = tmp_path / "r.db"
    harsher = SIMPLE.replace("points: -15", "points: -25")
    with Engine.open(path, rules=rules) as store:
        store.ingest(C1 + C2)
        assert store.capital("c2") == 22
        [first] = store.rule_versions()
        assert first["active"]
        rules.write_text(harsher, encoding="utf-8")
        assert store.use_rules(rules) is True
        assert store.use_rules(rules) is False  # already in use
        versions = store.rule_versions()
        assert len(versions) == 2
        [active] = [v for v in versions if v["active"]]
        assert active["hash"] != first["hash"]
        memory = memory_engine(load_texts([("rules.yaml", harsher)]), C1 + C2)
        for c in ("c1", "c2"):
            assert store.capital(c) == memory.capital(c)
            assert [e.to_dict() for e in store.explain(c)] == \
                [e.to_dict() for e in memory.explain(c)]
        assert store.capital("c2") == 2
        assert store.db.execute(
            "SELECT capital FROM customers WHERE id = 'c2'").fetchone()[0] == 2
    with Engine.open(path) as reopened:
        assert reopened.rules.sources[0].text == harsher
        assert reopened.capital("c2") == 2
        reopened.ingest([event("late", "c2", "incident", 6)])
        assert reopened.explain("c2")[-1].reason.startswith("incident: -25 points")
        assert reopened.capital("c2") == 0
        assert reopened.rule_versions() == versions


# -- dead letters ----------------------------------------------------------------------


def test_an_event_without_time_is_kept_as_a_dead_letter(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        report = store.ingest([event("p", "c1", "purchase", 1),
                               {"id": "no-time", "customer": "c1", "type": "gift"}])
        assert (report.ingested, report.dead_lettered) == (1, 1)
        [letter] = store.dead_letters()
        assert "'at'" in letter["reason"]
        assert json.loads(letter["raw"])["id"] == "no-time"
        assert letter["origin"] == "api"

        again = store.retry_dead_letters()
        assert (again.ingested, again.dead_lettered) == (0, 1)
        [still] = store.dead_letters()
        assert (still["raw"], still["reason"]) == (letter["raw"], letter["reason"])
        assert store.stats()["dead_letters"] == 1
        assert store.capital("c1") == 50


def test_a_dead_letter_that_is_fixed_goes_in_on_retry(tmp_path):
    line = json.dumps(event("g", "c1", "gift", 2))
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([event("p", "c1", "purchase", 1)])
        unreadable = EventError("invalid JSON: oops at column 3")
        report = store.ingest([Incoming(raw=unreadable, origin="feed.jsonl", line=7,
                                        text=line + "\n")])
        assert report.dead_lettered == 1
        assert report.problems == [f"feed.jsonl:7: {unreadable}"]
        [letter] = store.dead_letters()
        assert (letter["origin"], letter["line"], letter["raw"]) == ("feed.jsonl", 7, line)

        retried = store.retry_dead_letters()
        assert (retried.ingested, retried.dead_lettered) == (1, 0)
        assert store.dead_letters() == []
        assert store.capital("c1") == 70
        assert store.db.execute("SELECT id FROM events ORDER BY id").fetchall() == [
            ("g",), ("p",)]


def test_a_process_call_with_a_bad_event_raises_and_keeps_it(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        with pytest.raises(EventError, match="'at'"):
            store.process({"id": "x", "customer": "c1", "type": "gift"})
        assert len(store.dead_letters()) == 1
        outcome = store.process(event("p", "c1", "purchase", 1))
        assert outcome.capital_after == 50
        assert store.capital("c1") == 50


# -- tick ------------------------------------------------------------------------------


def test_tick_decides_what_the_in_memory_engine_decides(tmp_path):
    events = retail_events()
    memory = memory_engine(RETAIL, events)
    now = "2025-08-15T00:00:00+00:00"
    with Engine.open(tmp_path / "r.db", rules=RETAIL) as store:
        store.ingest(events)
        due = store.db.execute("SELECT count(*) FROM customers WHERE next_change_at <= ?",
                               [datetime.fromisoformat(now).timestamp()]).fetchone()[0]
        total = store.db.execute("SELECT count(*) FROM customers").fetchone()[0]
        assert 0 < due < total
        made = store.tick(now)
        expected = memory.tick(now)
        assert len(expected) > 5
        assert [d.id for d in made] == [d.id for d in expected]
        assert [d.to_dict() for d in made] == [d.to_dict() for d in expected]
        assert store.tick(now) == []
        for c in memory.customers():
            assert store.level(c) == memory.level(c), c
        stored = sorted((d.to_dict() for d in store.decisions()), key=lambda d: d["id"])
        assert stored == sorted((d.to_dict() for d in memory.decisions()),
                                key=lambda d: d["id"])


def test_ticking_along_the_way_decides_what_one_tick_decides(tmp_path):
    events = retail_events(2000)
    with Engine.open(tmp_path / "along.db", rules=RETAIL) as along, \
            Engine.open(tmp_path / "once.db", rules=RETAIL) as once:
        along.ingest(events)
        once.ingest(events)
        made = along.tick("2025-06-01T00:00:00+00:00") + along.tick("2025-09-01T00:00:00Z")
        assert [d.id for d in made] == [d.id for d in once.tick("2025-09-01T00:00:00Z")]


def test_next_change_is_indexed(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=RETAIL) as store:
        plan = " ".join(str(row[-1]) for row in store.db.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM customers WHERE next_change_at <= 1"))
        assert "customers_next_change" in plan


def test_a_rules_change_replays_every_customer_to_the_last_tick(tmp_path):
    """Customers the tick did not visit are brought to its time under the new rules,
    as a database built with those rules and ticked alike."""
    drain = SIMPLE.replace("levels:", "silence: {after: 2d, rate_per_day: 1}\nlevels:")
    first = simple_rules(tmp_path, drain.replace("below: 40", "below: 10"))  # day 42
    second = tmp_path / "second.yaml"
    second.write_text(drain.replace("below: 40", "below: 30"))  # day 22
    events = [event("p1", "c1", "purchase", 1), event("p2", "c2", "purchase", 2)]
    now = (START + timedelta(days=30)).isoformat()
    with Engine.open(tmp_path / "a.db", rules=first) as switched, \
            Engine.open(tmp_path / "b.db", rules=second) as built:
        for store in (switched, built):
            store.ingest(events)
        assert switched.tick(now) == []
        assert len(built.tick(now)) == 2
        switched.use_rules(second)
        for cid in ("c1", "c2"):
            assert switched.level(cid) == built.level(cid) == "watch"
            assert switched.next_change(cid) == built.next_change(cid)
        assert sorted(d.id for d in switched.decisions()) == \
            sorted(d.id for d in built.decisions())


def test_odd_inputs_are_each_kept_as_a_dead_letter(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        bad_source = {**event("x", "c1", "gift", 1), "at": "2026-01-02T00:00:00",
                      "source": 10**30}
        report = store.ingest([["x"], "y", 5, None, bad_source,
                               event("ok", "c1", "purchase", 0)])
        assert (report.ingested, report.dead_lettered) == (1, 5)
        assert [d["raw"] for d in store.dead_letters()][:4] == ['["x"]', '"y"', "5", "null"]


def test_a_dead_letter_ends_when_its_fixed_event_lands_in_the_same_batch(tmp_path):
    broken = {**event("z", "c1", "gift", 1), "at": "2026-01-02T00:00:00"}
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        report = store.ingest([event("p", "c1", "purchase", 0), broken,
                               event("z", "c1", "gift", 1)])
        assert (report.ingested, report.dead_lettered) == (2, 1)
        assert store.dead_letters() == []


def test_a_merge_keeps_one_decision_for_what_both_customers_decided(tmp_path):
    drain = SIMPLE.replace("levels:", "silence: {after: 2d, rate_per_day: 1}\nlevels:")
    events = [event("p1", "c1", "purchase", 0), event("z1", "c1", "gift", 0),
              event("p2", "c2", "purchase", 0), event("z2", "c2", "gift", 0)]
    now = (START + timedelta(days=33)).isoformat()
    rules = simple_rules(tmp_path, drain)
    with Engine.open(tmp_path / "a.db", rules=rules) as merged, \
            Engine.open(tmp_path / "b.db", rules=rules) as linked_first:
        merged.ingest(events)
        assert len(merged.tick(now)) == 2  # each customer crosses at the same instant
        merged.ingest([{"type": "identify", "customer": "c1", "aliases": ["c2"]}])
        linked_first.ingest([{"type": "identify", "customer": "c1", "aliases": ["c2"]},
                             *events])
        linked_first.tick(now)
        assert same_database(merged) == same_database(linked_first)


def test_migration_scripts_split_into_statements_as_sqlite_reads_them():
    from retention.store import StoreError, _migrations, _statements

    script = "CREATE TABLE a (x); CREATE TABLE b (y TEXT DEFAULT ';'); /* done */\n-- end\n"
    assert [s.strip() for s in _statements(script)] == [
        "CREATE TABLE a (x);", "CREATE TABLE b (y TEXT DEFAULT ';');"]
    with pytest.raises(StoreError):
        list(_statements("INSERT INTO t VALUES ('x"))  # a string never closed
    for _, text in _migrations():
        assert all(sqlite3.complete_statement(s) for s in _statements(text))


def test_a_merge_keeps_the_delivered_one_of_two_equal_decisions(tmp_path):
    drain = SIMPLE.replace("levels:", "silence: {after: 2d, rate_per_day: 1}\nlevels:")
    events = [event("p1", "c1", "purchase", 0), event("p2", "c2", "purchase", 0)]
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path, drain)) as store:
        store.ingest(events)
        store.tick((START + timedelta(days=20)).isoformat())
        [sent] = store.decisions("c2")
        store.db.execute("UPDATE decisions SET status = 'sent' WHERE id = ?", [sent.id])
        store.ingest([{"type": "identify", "customer": "c1", "aliases": ["c2"]}])
        assert [(d.id, d.status) for d in store.decisions("c1")] == [(sent.id, "sent")]


def test_a_dead_letter_is_not_ended_by_another_event_with_its_id(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([event("e1", "c1", "purchase", 0)])
        clash = {**event("e1", "c7", "incident", 3), "at": "2026-01-04T00:00:00"}
        report = store.ingest([clash, event("e2", "c1", "gift", 4)])
        assert report.dead_lettered == 1
        assert len(store.dead_letters()) == 1


def test_a_dead_letter_names_its_event_as_the_event_log_does(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([{**event("e1", "c1", "purchase", 0), "at": "bad", "source": 0}])
        store.ingest([{**event("e1", "c1", "purchase", 0), "source": 0}])
        assert store.dead_letters() == []
        assert store.db.execute("SELECT source, id FROM events").fetchall() == [("", "e1")]


def test_an_identity_known_only_by_its_aliases_can_be_exported_and_forgotten(tmp_path):
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([{"type": "identify", "customer": "cust-qx81",
                       "aliases": ["email:qx81@example.com"]}])
        assert store.export("email:qx81@example.com")["aliases"] == ["email:qx81@example.com"]
        store.forget("email:qx81@example.com")
    data = (tmp_path / "r.db").read_bytes()
    assert b"qx81" not in data


def test_a_long_lived_engine_takes_up_the_rules_another_process_made_active(tmp_path):
    path = tmp_path / "shared.db"
    mild = "capital: {initial: 50, opens_on: [purchase]}\nrules:\n" \
           "  complaint: {when: event.type == 'complaint', points: -5, category: incident}\n"
    harsh = mild.replace("-5", "-30")
    at = "2026-01-0{}T10:00:00+00:00"
    with StoredEngine(path, load_texts([("r.yaml", mild)])) as server, \
            StoredEngine(path) as operator:
        server.ingest([{"id": "p", "customer": "c", "type": "purchase", "at": at.format(1)},
                       {"id": "k1", "customer": "c", "type": "complaint", "at": at.format(2)}])
        assert server.capital("c", at.format(2)) == 45
        operator.use_rules(load_texts([("r.yaml", harsh)]))  # retention rules use
        server.ingest([{"id": "k2", "customer": "d", "type": "purchase", "at": at.format(3)},
                       {"id": "k3", "customer": "d", "type": "complaint", "at": at.format(4)}])
        assert server.capital("d", at.format(4)) == 20  # the harsh rule, not the mild one
        assert server.capital("c", at.format(4)) == 20  # recomputed by the switch


def test_a_version_2_event_log_is_moved_to_the_appended_table(tmp_path):
    """Migration 3: the event log kept by (source, id) becomes a rowid table; the events
    stay, duplicates are still known, and ingesting carries on as in a new file."""
    events = retail_events(600)
    path = tmp_path / "v2.db"
    with Engine.open(path, rules=RETAIL) as store:
        store.ingest(events[:400])
    conn = sqlite3.connect(path)
    with conn:  # back to the layout of schema version 2
        conn.executescript("""
            CREATE TABLE events_v2 (source TEXT NOT NULL, id TEXT NOT NULL,
                customer TEXT NOT NULL, type TEXT NOT NULL, at TEXT NOT NULL,
                ts REAL NOT NULL, props TEXT NOT NULL, PRIMARY KEY (source, id))
                WITHOUT ROWID;
            INSERT INTO events_v2 SELECT source, id, customer, type, at, ts, props
                FROM events;
            DROP TABLE events;
            ALTER TABLE events_v2 RENAME TO events;
            CREATE INDEX events_customer ON events (customer, ts);
            PRAGMA user_version = 2;
        """)
    conn.close()
    with Engine.open(path) as store:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == schema_version()
        columns = [row[1] for row in store.db.execute("PRAGMA table_info(events)")]
        assert columns[0] == "seq"
        assert store.ingest(events[:400]).duplicates == 400
        store.ingest(events[400:])
        migrated = same_database(store)
    with Engine.open(tmp_path / "new.db", rules=RETAIL) as fresh:
        fresh.ingest(events)
        assert migrated == same_database(fresh)


# -- customers kept between batches ------------------------------------------------------


def test_customers_kept_between_batches_follow_another_connections_writes(tmp_path):
    """A customer kept in memory from the last batch is dropped once another
    connection has committed: its events count."""
    path, rules = tmp_path / "shared.db", simple_rules(tmp_path)
    with Engine.open(path, rules=rules) as first, Engine.open(path) as second:
        first.ingest([event("p", "c1", "purchase", 0), event("g", "c1", "gift", 1)])
        assert "c1" in first._kept
        second.ingest([event("i", "c1", "incident", 2)])
        first.ingest([event("r", "c1", "review", 3)])
        assert [e.event_id for e in first.explain("c1")] == ["p", "g", "i", "r"]
        assert first.capital("c1") == 50 + 20 - 15 + 2


def test_customers_kept_between_batches_follow_this_engines_other_writes(tmp_path):
    """A tick, a rules switch or an erasure writes snapshots outside ingestion: the
    kept customers are dropped, and the next batch starts from what was stored."""
    with Engine.open(tmp_path / "r.db", rules=simple_rules(tmp_path)) as store:
        store.ingest([event("p", "c1", "purchase", 0), event("i", "c1", "incident", 2),
                      event("j", "c1", "incident", 3)])
        assert store.level("c1") == "watch" and "c1" in store._kept
        store.use_rules(simple_rules(tmp_path, SIMPLE.replace("below: 40", "below: 15")))
        assert store.level("c1") is None and not store._kept
        store.ingest([event("k", "c1", "incident", 4)])
        assert store.level("c1") == "watch"  # at 5: fired now, under the new level
        assert [d.trigger for d in store.decisions("c1")] == ["k"]
        store.forget("c1")
        store.ingest([event("r", "c1", "review", 5)])
        assert store.capital("c1") is None  # a prospect again: nothing of before


def test_kept_customers_are_bounded_and_give_what_reloading_gives(tmp_path, monkeypatch):
    import retention.store as store_module

    monkeypatch.setattr(store_module, "KEEP", 40)
    events = retail_events(1500)
    with Engine.open(tmp_path / "kept.db", rules=RETAIL, batch_size=97) as kept, \
            Engine.open(tmp_path / "one.db", rules=RETAIL) as one:
        kept.ingest(events)
        one.ingest(events)
        assert 0 < len(kept._kept) <= 40
        assert dump(kept, skip=ENCODING) == dump(one, skip=ENCODING)
        assert later_capitals(kept) == later_capitals(one)


def test_a_batch_that_fails_after_writing_its_snapshots_keeps_none_of_its_customers(
        tmp_path, monkeypatch):
    """The snapshots were written, then the batch failed: what it held in memory is
    ahead of the rolled-back database, so none of it serves the next batch."""
    events = retail_events(1200)
    first, second = events[:600], events[600:]
    with Engine.open(tmp_path / "clean.db", rules=RETAIL) as clean:
        clean.ingest(first)
        clean.ingest(second)
        expected = dump(clean, skip=ENCODING)
    with Engine.open(tmp_path / "r.db", rules=RETAIL) as store:
        store.ingest(first)
        real = StoredEngine._apply_steps

        def fail_after(self, *args, **kwargs):
            real(self, *args, **kwargs)
            raise RuntimeError("power cut")

        with monkeypatch.context() as patch:
            patch.setattr(StoredEngine, "_apply_steps", fail_after)
            with pytest.raises(RuntimeError, match="power cut"):
                store.ingest(second)
        store.ingest(second)
        assert dump(store, skip=ENCODING) == expected


def test_late_events_of_one_customer_in_a_batch_are_recomputed_together(tmp_path):
    """Events that fall between a customer's stored events: the batch recomputes the
    customer once for all of them (each alone cost the whole history, so n of them
    the square of n), with what each event did as if they came one by one."""
    history = [e for e in retail_events(27390) if e["customer"] in ("c-0830", "c-0243")]
    early, late = history[::2], history[1::2]
    late = [*late, late[3]]  # a repeat inside the batch
    with Engine.open(tmp_path / "together.db", rules=RETAIL) as together, \
            Engine.open(tmp_path / "apart.db", rules=RETAIL) as apart, \
            Engine.open(tmp_path / "in_order.db", rules=RETAIL) as in_order:
        for store in (together, apart):
            store.ingest(early)
        together.ingest([*late, early[0]])  # an event it holds already, too
        outcomes = []
        for ev in [*late, early[0]]:
            outcomes.append(apart.process(ev))
        in_order.ingest(history)
        assert same_database(together) == same_database(apart) == same_database(in_order)
        assert later_capitals(together) == later_capitals(in_order)
        assert together.decisions() == apart.decisions()
    assert sum(o.duplicate for o in outcomes) == 2


def test_each_late_event_of_a_batch_answers_what_it_did(tmp_path):
    """The outcome of each late event recomputed with others is what it did alone:
    its capital before and after, its ledger, and the decisions it triggered."""
    rules = simple_rules(tmp_path)
    first = [event("p", "c", "purchase", 0), event("g", "c", "gift", 10)]
    late = [event("i", "c", "incident", 2), event("r", "c", "review", 4),
            event("g2", "c", "gift", 6)]

    def shown(outcome):
        return (outcome.capital_before, outcome.capital_after,
                [(e.rule, e.points) for e in outcome.ledger],
                sorted((d.action, d.trigger) for d in outcome.decisions))

    with Engine.open(tmp_path / "a.db", rules=rules) as together, \
            Engine.open(tmp_path / "b.db", rules=rules) as apart:
        together.ingest(first)
        apart.ingest(first)
        _, results = together.ingest_batch(late)
        alone = [apart.process(ev) for ev in late]
        assert [shown(o) for _, o in results] == [shown(o) for o in alone]
        assert same_database(together) == same_database(apart)
    assert shown(alone[0])[3] == [("flag", "i")] and shown(alone[1])[3] == [("thanks", "r")]
