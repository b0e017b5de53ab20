"""The embedded store: the engine's state in one SQLite file, through sqlite-utils.

``Engine.open("retention.db", rules="rules/")`` gives a :class:`StoredEngine`: the
same engine, with its customers kept in the database instead of memory. Events
go in by batches, one transaction per batch: a batch lands whole, with its
events, snapshots, ledger and decisions, or not at all. Memory holds only the
customers of the batch at hand, and a bounded number kept as stored for the next
batch (``KEEP``), so it stays flat however many are stored.

Tables (see ``migrations/``): ``events`` (append-only, keyed by source and id),
``customers`` (one snapshot per customer, indexed on ``next_change_at``),
``ledger``, ``decisions`` (the outbox), ``aliases``, ``rule_versions``,
``dead_letters`` and ``counters``.

Readings of the design taken here, documented in docs/store.md:

- Within a batch, events are applied in time order; an event older than its
  customer's latest recomputes that customer from their logged events.
- A recomputation rewrites the customer's ledger, and the outbox follows the
  recomputed history: a decision still undelivered that the history no longer
  makes leaves it. So any batch split and ingestion order gives the same
  database as ingesting the events sorted, once.
- ``identify`` events (``customer`` and ``aliases``; no ``id`` or ``at``
  needed) take effect at their place in the input. With ``move_aliases: false``
  an alias that already names another customer stays theirs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import sqlite_utils

from .capital import capital_at
from .engine import (
    Customer,
    Engine,
    _moment,
    _pack,
    _unpack,
    decided,
    decision_id,
    packed,
)
from .errors import EventError, LineError, RetentionError
from .models import (
    Decision,
    Event,
    LedgerEntry,
    Outcome,
    id_of,
    parse_json_line,
    source_of,
    text_problem,
)
from .rules import load_rules, load_texts
from .rules.model import RuleSet
from .snapshot import decode, encode
from .times import from_seconds, parse_instant
from .webevents import BodyError, Ignored, Unavailable

#: statuses the engine may still change: nothing has left the outbox yet
UNDELIVERED = ("pending", "suppressed", "held_out")
#: SQLite's application id of a retention database ("RETN")
APPLICATION_ID = 0x5245544E
#: reasons an ingest report keeps in memory
MAX_PROBLEMS = 1000
#: events per transaction by default: a batch writes every page it touches once
#: (snapshots, indexes), so bigger batches write less per event; memory holds one
#: batch and the customers it touches
BATCH = 50_000
#: SQLite's page cache per connection (KiB): bounded, whatever the number of
#: customers stored
CACHE_KIB = 16_384
#: customers kept in memory from one ingest batch to the next, exactly as stored
#: (a bounded cache: memory stays flat however many customers are stored)
KEEP = 20_000
#: customers loaded or written per statement (under SQLite's variable limit)
_CHUNK = 500


class StoreError(RetentionError):
    """The database cannot be used as asked (not SQLite, too new, read-only...)."""


class UnknownCustomer(StoreError):
    """A customer the database holds nothing about."""


class ScrubPending(StoreError):
    """An erasure that is committed, but whose scrub of the file (VACUUM, then
    emptying the write-ahead log) could not finish: the file keeps its size, and
    traces of what was erased may stay in its free pages or its log until a later
    scrub (any later ``forget`` runs it first). ``erased`` says what was erased."""

    def __init__(self, message: str, erased: dict[str, int] | None = None):
        super().__init__(message)
        self.erased = erased or {}


@attrs.define
class IngestReport:
    """What one ingestion did."""

    ingested: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    decisions: int = 0
    identified: int = 0
    merged: int = 0
    #: ``origin:line: reason`` of the first dead-lettered inputs (all of them are in
    #: the dead-letter table; this list stops at ``MAX_PROBLEMS``)
    problems: list[str] = attrs.Factory(list)

    def add(self, other: IngestReport) -> None:
        for field in ("ingested", "duplicates", "dead_lettered", "decisions", "identified",
                      "merged"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        self.problems.extend(other.problems[:MAX_PROBLEMS - len(self.problems)])


@attrs.frozen
class Incoming:
    """One input to ingest: a parsed JSON object, or the reason it could not be
    parsed; where it came from, and its text for the dead-letter table."""

    raw: Any
    origin: str = "api"
    line: int | None = None
    text: str | None = None
    #: False when ``text`` cannot be parsed again on its own (a CSV row without its
    #: header, bytes that were not UTF-8): a retry leaves such a dead letter as it is
    retriable: bool = True
    #: the event source that turns ``text`` into events on a retry (a hook's body it
    #: could not use yet, see ``webevents.Unavailable``); None: ``text`` is events
    resend_to: str | None = None


#: properties as stored: compact JSON, refusing what JSON cannot hold (NaN, Infinity)
_to_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _resent(letter: Mapping[str, Any], resend: Any) -> list[Incoming]:
    """What a dead letter's source makes of its body now: its events (with the
    source's name), or the letter again with the new reason."""
    name, text = letter["resend_to"], letter["raw"]
    try:
        raws = resend(name, text)
        if not isinstance(raws, list):
            raise RetentionError(f"the source gave {type(raws).__name__}, not a list")
    except Exception as exc:
        reason = str(exc) if isinstance(exc, RetentionError) else f"{type(exc).__name__}: {exc}"
        # kept for a later retry (a lookup failed again, a setting is missing, the
        # source is not installed here) unless the source now refuses the body
        later = isinstance(exc, Unavailable) or not isinstance(exc, BodyError)
        return [Incoming(raw=RetentionError(reason), origin=letter["origin"], text=text,
                         retriable=later, resend_to=name if later else None)]
    events = [raw for raw in raws if not isinstance(raw, Ignored)]
    return [Incoming(raw={**raw, "source": raw.get("source") or name}
                     if isinstance(raw, Mapping) else raw,
                     origin=letter["origin"], line=n if len(events) > 1 else None)
            for n, raw in enumerate(events, 1)]


def _storable(text: str) -> str:
    """``text`` as SQLite can store it: a lone surrogate (which JSON can spell, and
    which no UTF-8 text holds) is written as its JSON escape, so a dead letter keeps
    what it was given and reads back the same when parsed again."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"), sort_keys=True)


def _letter_text(raw: Any) -> str:
    """The text a dead letter keeps of an input given as a value (through the API):
    its JSON, with what JSON cannot write (a cycle, a whole number of more digits
    than Python writes, mixed keys) written as a note in its place."""
    try:
        return _dumps(raw)
    except (TypeError, ValueError, RecursionError):
        return _dumps(_writable(raw, 0, set()))


def _writable(value: Any, depth: int, seen: set[int]) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 14_000:  # (over 4,200 digits: more than Python writes)
            return f"(a whole number of about {int(value.bit_length() * 0.30103)} digits)"
        return value
    if not isinstance(value, Mapping | list | tuple):
        return value
    if depth > 100:
        return "(nested too deeply to write)"
    if id(value) in seen:
        return "(a value holding itself)"
    seen = seen | {id(value)}
    if isinstance(value, Mapping):
        return {str(k): _writable(v, depth + 1, seen) for k, v in value.items()}
    return [_writable(v, depth + 1, seen) for v in value]


def _rules_hash(rules: RuleSet) -> str:
    digest = hashlib.sha256()
    for source in sorted(rules.sources, key=lambda s: Path(s.path).name):
        digest.update(Path(source.path).name.encode() + b"\0" + source.text.encode() + b"\0")
    return digest.hexdigest()


def _explain_open_error(path: Path, exc: sqlite3.Error) -> StoreError:
    text = str(exc)
    if "not a database" in text:
        return StoreError(f"{path}: not a SQLite database ({text})")
    if "unable to open" in text:
        where = path.parent if str(path.parent) else Path(".")
        reason = "does not exist" if not where.exists() else "is not writable"
        return StoreError(f"{path}: cannot open the database: the folder {where} {reason}")
    if "readonly" in text or "read-only" in text:
        return StoreError(f"{path}: the database or its folder is read-only ({text})")
    return StoreError(f"{path}: {text}")


def _migrations() -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("retention.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of a migration script, one at a time (a statement ends at
    a semicolon that SQLite says completes it, wherever it is on its line)."""
    buffer = ""
    for part in script.split(";"):
        buffer += part + ";"
        if sqlite3.complete_statement(buffer):
            if _uncommented(buffer[:-1]):
                yield buffer
            buffer = ""
    rest = _uncommented(buffer[:-1])
    if rest:
        raise StoreError(f"an incomplete statement ends a migration: {rest[:60]}")


def _uncommented(sql: str) -> str:
    return re.sub(r"--[^\n]*|/\*.*?\*/", "", sql, flags=re.S).strip()


def _wal(conn: sqlite3.Connection, attempts: int = 200) -> None:
    """Switch to WAL mode. The switch takes a lock that SQLite's busy timeout does
    not wait for: while another process creates the same new file, try again."""
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def schema_version() -> int:
    """The schema version this code writes."""
    return _migrations()[-1][0]


def rules_differ(engine: Engine, rules: RuleSet) -> bool:
    """Whether ``rules`` is another version than the one ``engine`` runs."""
    return _rules_hash(rules) != _rules_hash(engine.rules)


class StoredEngine(Engine):
    """The engine with its state in a SQLite database (see the module docstring)."""

    def __init__(self, path: str | Path, rules: RuleSet | str | Path | None = None, *,
                 batch_size: int = BATCH, read_only: bool = False):
        self.path = Path(path)
        self.batch_size = max(1, int(batch_size))
        #: opened with SQLite's read-only mode: reading works, any write raises
        self.read_only = read_only
        # a database that cannot start (no rules, a broken rule file) leaves no file
        new = not self.path.exists()
        if read_only and (new or rules is not None):
            raise StoreError(f"{self.path}: no such database" if new else
                             f"{self.path}: opened read-only, it cannot take new rules")
        if new and rules is None:
            raise StoreError(f"{self.path}: no rules yet: give a rule file or folder "
                             "(retention rules use PATH)")
        given = None if rules is None else rules if isinstance(rules, RuleSet) \
            else load_rules(rules)  # a broken file stops here: nothing changes
        self.db = self._connect(self.path, read_only=read_only)
        try:
            self._migrate()
            active = self._active_rules()
            if given is None and active is None:
                raise StoreError(f"{self.path}: no rules yet: give a rule file or folder "
                                 "(retention rules use PATH)")
            loaded = active if active is not None else given
        except BaseException:
            self.db.close()
            if new:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            raise
        assert loaded is not None
        super().__init__(loaded)
        #: customers recomputed in the current batch: their ledger is rewritten
        self._rewrite: set[str] = set()
        self._full_ledgers: dict[str, list[LedgerEntry]] = {}
        self._replayed: str | None = None
        #: customer ids looked up in this batch and not stored
        self._absent: set[str] = set()
        #: customers loaded without their stored events (see ``_ensure_log``)
        self._partial: set[str] = set()
        #: customer id -> (the customer, its log length, its level time) when last
        #: planned exactly (see ``_save``)
        self._planned: dict[str, tuple[Customer, int, float]] = {}
        #: customers merged into another in this batch
        self._gone: set[str] = set()
        #: undelivered decisions a recomputed history no longer makes
        self._drop: set[str] = set()
        #: (source, id) of the events the batch stored
        self._landed: list[tuple[Any, ...]] = []
        #: the customers whose snapshots the batch wrote, as written
        self._stored: dict[str, Customer] = {}
        #: customers as the last ingest batches stored them, least recently stored
        #: first; good for the next batch only (see ``_check_kept``)
        self._kept: OrderedDict[str, Customer] = OrderedDict()
        #: SQLite's data_version when the kept customers were last checked
        self._kept_version: int | None = None
        #: whether the transaction at hand is an ingest batch that may use them
        self._keeping = False
        #: the rules in use and their hash, to notice another process's `rules use`
        self._rules_hash: tuple[RuleSet, str] | None = None
        if given is not None:
            if active is None:
                self._record_rules(given)
            else:  # another version: recorded, and every customer recomputed with it
                self.use_rules(given)

    # -- opening -----------------------------------------------------------------------

    @staticmethod
    def _connect(path: Path, *, read_only: bool = False) -> sqlite_utils.Database:
        try:
            conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True,
                                   timeout=30, isolation_level=None) if read_only \
                else sqlite3.connect(str(path), timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise _explain_open_error(path, exc) from None
        try:
            # read before anything is written: a file that is not ours stays as it was
            current, application, tables = conn.execute(
                "SELECT (SELECT user_version FROM pragma_user_version),"
                " (SELECT application_id FROM pragma_application_id),"
                " (SELECT count(*) FROM sqlite_master)").fetchone()
            latest = _migrations()[-1][0]
            if current > latest:
                raise StoreError(
                    f"{path}: schema version {current} is newer than this "
                    f"retention-engine knows ({latest}); upgrade retention-engine")
            if (current == 0 and tables) or (current and application != APPLICATION_ID):
                raise StoreError(f"{path}: a SQLite database, but not a retention one")
            if not read_only:  # (the journal mode is the file's: set once, kept)
                _wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            # deleted rows are overwritten, so a forgotten customer leaves no trace
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        except StoreError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise _explain_open_error(path, exc) from None
        return sqlite_utils.Database(conn)

    def _migrate(self) -> None:
        conn = self.db.conn
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] >= schema_version():
                return
            if self.read_only:
                raise StoreError(f"{self.path}: an older schema: open it once with this "
                                 "retention-engine (retention stats) to migrate it")
            # the write lock first, then the version again: two processes opening a
            # new file at once migrate it once
            conn.execute("BEGIN IMMEDIATE")
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            for version, script in _migrations():
                if version > current:
                    for statement in _statements(script):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {version}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise _explain_open_error(self.path, exc) from None

    def _active_rules(self) -> RuleSet | None:
        row = self.db.execute(
            "SELECT files FROM rule_versions WHERE active = 1").fetchone()
        if row is None:
            return None
        try:
            files = [(p, t) for p, t in json.loads(row[0])]
            if not all(isinstance(p, str) and isinstance(t, str) for p, t in files):
                raise TypeError
        except (ValueError, TypeError):
            raise StoreError(f"{self.path}: the stored rules version is damaged") from None
        return load_texts(files)

    def _record_rules(self, rules: RuleSet) -> bool:
        """Make ``rules`` the active version; returns False if it already was."""
        digest = _rules_hash(rules)
        row = self.db.execute("SELECT active FROM rule_versions WHERE hash = ?",
                              [digest]).fetchone()
        if row is not None and row[0] == 1:
            return False
        with self._writing():
            self._activate(rules)
        return True

    def follow_rules(self) -> None:
        """Take up the rules version another process made active (``retention rules
        use`` while a server runs). Ingestion calls it inside its transaction."""
        row = self.db.execute("SELECT hash FROM rule_versions WHERE active = 1").fetchone()
        if row is None:
            return
        if self._rules_hash is None or self._rules_hash[0] is not self._rules:
            self._rules_hash = (self._rules, _rules_hash(self._rules))
        if row[0] != self._rules_hash[1]:
            active = self._active_rules()
            assert active is not None
            self._derive(active)

    def _activate(self, rules: RuleSet) -> None:
        """Inside a transaction: record ``rules`` as the active version."""
        files = _dumps([[s.path, s.text] for s in rules.sources])
        self.db.execute("UPDATE rule_versions SET active = 0 WHERE active = 1")
        self.db.execute(
            "INSERT INTO rule_versions (hash, files, used_from, active) VALUES (?, ?, ?, 1)"
            " ON CONFLICT(hash) DO UPDATE SET active = 1, used_from = excluded.used_from",
            [_rules_hash(rules), files, _now_text()])

    def close(self) -> None:
        self._kept.clear()
        self.db.close()

    def __enter__(self) -> StoredEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _writing(self, *, ingest: bool = False) -> Any:
        """One transaction; a SQLite failure becomes a StoreError (nothing is kept).
        Only an ``ingest`` batch may use the customers kept from the one before."""
        return _Transaction(self, ingest)

    def _check_kept(self, ingest: bool) -> None:
        """At the start of a transaction: the customers kept from the last ingest
        batch are what their snapshots hold as long as no other connection has
        committed since (SQLite's data_version says) and this engine has written
        nothing but ingest batches; otherwise they are dropped."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if not ingest or version != self._kept_version:
            self._kept.clear()
        self._kept_version = version
        self._keeping = ingest

    # -- loading and saving customers ---------------------------------------------------

    def _load(self, ids: Iterable[str]) -> None:
        """Bring the snapshots of ``ids`` (those not already loaded) into memory."""
        absent = self._absent
        wanted = [cid for cid in dict.fromkeys(ids)
                  if cid not in self._customers and cid not in absent]
        if self._keeping and self._kept:
            kept, rest = self._kept, []
            for cid in wanted:
                c = kept.pop(cid, None)
                if c is None:
                    rest.append(cid)
                else:  # (taken out: a batch that fails does not give it back)
                    # as stored: without the events stored before (see _ensure_log)
                    self._customers[cid] = c
                    self._partial.add(cid)
            wanted = rest
        absent.update(wanted)  # until found below: not asked again in this batch
        for cid, blob in self._rows_in("SELECT id, state FROM customers WHERE id IN ({})",
                                       wanted):
            self._customers[cid] = self._decode(cid, blob)
            self._partial.add(cid)
            absent.discard(cid)

    def _rows_in(self, sql: str, values: list[Any], before: tuple[Any, ...] = (),
                 after: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        """The rows of ``sql`` with its ``IN ({})`` list given ``values``, a chunk at a
        time (SQLite limits the parameters of one statement)."""
        for start in range(0, len(values), _CHUNK):
            part = values[start:start + _CHUNK]
            yield from self.db.execute(sql.format(",".join("?" * len(part))),
                                       [*before, *part, *after])

    def _decode(self, cid: str, blob: bytes) -> Customer:
        try:
            customer = decode(blob)
            if not isinstance(customer, Customer):
                raise TypeError(f"a {type(customer).__name__}, not a customer")
            return customer
        except Exception as exc:  # bytes changed outside the engine
            raise StoreError(f"{self.path}: the stored state of customer {cid} is damaged "
                             f"({type(exc).__name__}: {exc})") from None

    def _loaded(self, cid: str) -> Customer | None:
        self._load([cid])
        return self._customers.get(cid)

    def _forget_loaded(self, *, keep: bool = False) -> None:
        """The batch is over: forget its customers, but ``keep`` those it stored (it
        committed) for the next one."""
        if keep:
            kept = self._kept
            for cid, c in self._stored.items():
                if self._customers.get(cid) is c:
                    kept[cid] = c
                    kept.move_to_end(cid)
            while len(kept) > KEEP:
                kept.popitem(last=False)
        self._stored.clear()
        self._customers.clear()
        self._planned.clear()
        self._absent.clear()
        self._partial.clear()
        self._gone.clear()
        self._drop.clear()
        self._landed = []
        self._seen.clear()
        self._seen_from.clear()
        self._rewrite.clear()
        self._full_ledgers.clear()

    def _ensure_log(self, c: Customer) -> None:
        """Complete ``c.log`` with the events stored before this batch.

        A snapshot does not hold the customer's events (the event log does): most
        events only append, and a snapshot rewritten at every batch would carry
        the whole history each time. A recomputation reads them back here.
        """
        if c.id not in self._partial:
            return
        self._partial.discard(c.id)
        stored = bytearray()
        for row in self.db.execute(
                "SELECT ts, id, source, type, at, props FROM events WHERE customer = ?",
                [c.id]):
            stored += _pack((row[0], row[1], row[2], row[3], datetime.fromisoformat(row[4]),
                             json.loads(row[5])))
        c.log[:0] = stored

    def _history(self, c: Customer) -> Iterator[tuple[Any, ...]]:
        self._ensure_log(c)
        return _unpack(c.log)

    def _enqueue(self, c: Customer, when: float) -> None:
        """The store keeps the time in the snapshot (``next_change_at``) instead."""

    def _schedule(self, c: Customer) -> None:
        Engine._schedule(self, c)
        # planned exactly for this customer as it is: every change to a customer
        # appends an event to its log or moves its level time, or makes a new object
        self._planned[c.id] = (c, len(c.log), c.level_time)

    def _save(self, touched: Iterable[str], *, rewrite: Iterable[str] = ()) -> None:
        """Write the snapshots of ``touched``; rewrite the ledger and decisions of
        ``rewrite`` (customers recomputed from their history)."""
        if self._drop:
            self.db.conn.executemany(
                "DELETE FROM decisions WHERE id = ? AND status IN (?, ?, ?)",
                [(did, *UNDELIVERED) for did in self._drop])
            self._drop.clear()
        for cid in rewrite:
            c = self._customers[cid]
            self.db.execute("DELETE FROM ledger WHERE customer = ?", [cid])
            ledger = self._full_ledgers.pop(cid, None)
            if ledger is None:
                ledger = []
                self._rebuild(cid, self._history(c), horizon=-math.inf, ledger=ledger)
            self._insert_ledger(ledger)
            self._upsert_decisions(decided(c).values())
        rules = self._rules
        rows = []
        for cid in touched:
            c = self._customers[cid]
            # the exact next change, whatever order the events came in (the engine may
            # keep an earlier, still valid one in memory), unless planned since the
            # customer last changed
            if self._planned.get(cid) != (c, len(c.log), c.level_time):  # (c: by identity)
                c.scheduled = math.inf
                self._schedule(c)
            capital = None if c.opened_at is None or c.last is None else capital_at(
                c, rules, c.last[0])
            c.log = bytearray()  # the event log holds the events (see _ensure_log)
            self._partial.add(cid)
            self._stored[cid] = c
            rows.append((cid, c.opened_at, c.level(rules),
                         capital, c.last[0] if c.last else None,
                         c.scheduled if c.scheduled < math.inf else None,
                         encode(c)))
        self.db.conn.executemany(
            "INSERT INTO customers (id, opened_at, level, capital, last_ts, next_change_at,"
            " state) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
            " opened_at = excluded.opened_at, level = excluded.level,"
            " capital = excluded.capital, last_ts = excluded.last_ts,"
            " next_change_at = excluded.next_change_at, state = excluded.state", rows)

    def _insert_ledger(self, entries: Iterable[LedgerEntry]) -> None:
        rows: list[tuple[Any, ...]] = []
        self._ledger_rows(entries, rows)
        self._write_ledger(rows)

    @staticmethod
    def _ledger_rows(entries: Iterable[LedgerEntry], rows: list[tuple[Any, ...]],
                     moment: datetime | None = None, ts: float | None = None,
                     text: str | None = None) -> None:
        """Append the ledger rows of ``entries`` to ``rows``; an entry at ``moment``
        (given with its ``ts`` and ``text``: the event's) is written with them."""
        for e in entries:
            if e.at is not moment:  # (an event's entries share its time: written once)
                moment = e.at
                ts, text = moment.timestamp(), moment.isoformat()
            rows.append((e.customer, ts, text, e.rule, e.points, e.event_id, e.category,
                         e.reason))

    def _write_ledger(self, rows: list[tuple[Any, ...]]) -> None:
        self.db.conn.executemany(
            "INSERT INTO ledger (customer, ts, at, rule, points, event_id, category, reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    @staticmethod
    def _decision_row(d: Decision) -> tuple[Any, ...]:
        return (d.id, d.customer, d.rule, d.action, _dumps(dict(d.params)), d.at.isoformat(),
                d.at.timestamp(), d.kind, d.via, d.trigger, d.status, d.reason)

    def _insert_decisions(self, decisions: Iterable[Decision]) -> None:
        self.db.conn.executemany(
            "INSERT OR IGNORE INTO decisions (id, customer, rule, action, params, at, ts,"
            " kind, via, trigger, status, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [self._decision_row(d) for d in decisions])

    def _upsert_decisions(self, decisions: Iterable[Decision]) -> None:
        marks = ",".join("?" * len(UNDELIVERED))
        self.db.conn.executemany(
            "INSERT INTO decisions (id, customer, rule, action, params, at, ts, kind, via,"
            " trigger, status, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET customer = excluded.customer,"
            " rule = excluded.rule, action = excluded.action, params = excluded.params,"
            " at = excluded.at, ts = excluded.ts, kind = excluded.kind, via = excluded.via,"
            " trigger = excluded.trigger, status = excluded.status, reason = excluded.reason"
            f" WHERE decisions.status IN ({marks})"
            # a failed one keeps its tries and backoff, unless the history now holds it
            # back (consent withdrawn earlier, pressure): then it is not sent at all
            " OR (decisions.status = 'failed' AND excluded.status != 'pending')",
            [(*self._decision_row(d), *UNDELIVERED) for d in decisions])

    # -- replays: the outbox follows the recomputed history ------------------------------

    def _recomputed(self, c: Customer, ledger: list[LedgerEntry]) -> None:
        """The customer's whole ledger is written again at the end of the batch."""
        self._full_ledgers[c.id] = ledger
        self._replayed = c.id

    def _reconcile(self, known: dict[str, Decision], fresh: Customer) -> list[Decision]:
        """The recomputed history is the truth for what has not left the outbox: a
        known decision it no longer makes leaves the outbox, and one it still makes
        is written as it now is. A decision that was delivered stays as it was, and
        one kept under another id (a merged alias) keeps that id."""
        truth = decided(fresh)
        merged: dict[str, Decision] = {}
        for did, d in truth.items():
            old = known.get(did)
            merged[did] = d if old is None or old.id == d.id else attrs.evolve(d, id=old.id)
        stale = {did: d for did, d in known.items() if did not in truth}
        if stale:
            delivered = self._delivered([d.id for d in stale.values()])
            for did, d in stale.items():
                if d.id in delivered:  # (under the customer it belongs to, after a merge)
                    merged[did] = d if d.customer == fresh.id else attrs.evolve(
                        d, customer=fresh.id)
                else:
                    self._drop.add(d.id)
        self._drop.difference_update(d.id for d in merged.values())
        fresh.decisions = packed(merged) or None
        self._rewrite.add(fresh.id)
        return [d for did, d in truth.items() if did not in known]

    def _delivered(self, ids: list[str]) -> set[str]:
        """Those of ``ids`` whose decision has left, or may have left, the outbox (sent,
        being sent). A failed one has not: the history may still take it back."""
        kept = (*UNDELIVERED, "failed")
        marks = ",".join("?" * len(kept))
        return {i for (i,) in self._rows_in(
            "SELECT id FROM decisions WHERE id IN ({})"
            f" AND status NOT IN ({marks})", ids, after=kept)}

    # -- ingestion ---------------------------------------------------------------------

    def ingest(self, items: Iterable[Incoming | Mapping[str, Any]], *, source: str = "",
               progress: Any = None) -> IngestReport:
        """Ingest events (mappings or :class:`Incoming`) by batches of ``batch_size``,
        one transaction each. Unusable input is kept in the dead-letter table with
        its reason and counted, never raised; ``progress(n)`` is called per batch."""
        report = IngestReport()
        batch: list[Incoming] = []
        for item in items:
            batch.append(item if isinstance(item, Incoming) else Incoming(raw=item))
            if len(batch) >= self.batch_size:
                report.add(self._ingest_batch(batch, source))
                if progress is not None:
                    progress(len(batch))
                batch = []
        if batch:
            report.add(self._ingest_batch(batch, source))
            if progress is not None:
                progress(len(batch))
        return report

    def ingest_batch(self, items: list[Incoming | Mapping[str, Any]], *, source: str = "",
                     messages: Iterable[tuple[bytes, float]] = ()
                     ) -> tuple[IngestReport, list[tuple[str, Any]]]:
        """Ingest ``items`` in one transaction, whatever ``batch_size`` says, and say
        what became of each, in order: ``("new", outcome)``, ``("duplicate", outcome)``,
        ``("identified", None)`` or ``("dead_lettered", reason)``. ``messages``, the
        signed messages that carried them (key, kept until), are recorded in the same
        transaction (see :meth:`message_stored`)."""
        batch = [item if isinstance(item, Incoming) else Incoming(raw=item) for item in items]
        results: dict[int, Any] = {}
        kept = list(messages)

        def record() -> None:
            # (what expired over a day before these do goes: the table stays small)
            self.db.execute("DELETE FROM signed_messages WHERE until < ?",
                            [min(until for _, until in kept) - 86_400])
            self.db.conn.executemany(
                "INSERT INTO signed_messages (key, until) VALUES (?, ?) ON CONFLICT(key)"
                " DO UPDATE SET until = max(until, excluded.until)", kept)

        report = self._ingest_batch(batch, source, results=results,
                                    also=record if kept else None)
        return report, [results.get(id(item), ("dead_lettered", "not used")) for item in batch]

    def message_stored(self, key: bytes, now: float) -> bool:
        """Whether a signed message (by ``signing.message_key``) was stored here and
        its signature could still be accepted at ``now``."""
        return self.db.execute("SELECT 1 FROM signed_messages WHERE key = ? AND until >= ?",
                               [key, now]).fetchone() is not None

    def process(self, event: Mapping[str, Any] | Event, *, source: str = "") -> Outcome:
        """Process and store one event (a batch of one). A bad event raises
        EventError and is kept in the dead-letter table."""
        raw = event.to_dict() if isinstance(event, Event) else event
        if isinstance(raw, Mapping) and raw.get("type") == "identify":
            raise EventError("an identify event links identifiers: give it to ingest()",
                             field="type", event_id=raw.get("id"))
        outcomes: list[Outcome] = []
        report = self._ingest_batch([Incoming(raw=raw)], source, outcomes=outcomes)
        if report.problems:
            raise LineError(report.problems[0].split(": ", 1)[-1])
        return outcomes[0]

    def _ingest_batch(self, batch: list[Incoming], source: str,
                      outcomes: list[Outcome] | None = None,
                      also: Any = None, results: dict[int, Any] | None = None
                      ) -> IngestReport:
        """One transaction. ``results``, when given, receives for each input
        (keyed by ``id(item)``) ``("new", outcome)``, ``("duplicate", outcome)``,
        ``("identified", None)`` or ``("dead_lettered", reason)``."""
        report = IngestReport()
        note = results.__setitem__ if results is not None else None
        dead: list[tuple[Any, ...]] = []
        resend: list[tuple[str, str]] = []  # (digest, source) of letters a source takes back
        steps: list[Any] = []  # Events, and identify requests in input order
        received = _now_text()

        def reject(item: Incoming, reason: str) -> None:
            raw = item.raw
            event_source = event_id = None
            if isinstance(raw, Mapping):
                # (source, id) as the event names them: the letter ends when that
                # event lands
                event_source = source_of(raw, source)
                if raw.get("type") != "identify":
                    event_id = id_of(raw)
                if source and not raw.get("source"):  # kept with the source it came under
                    text = _letter_text({**raw, "source": source})
                else:
                    text = item.text if item.text is not None else _letter_text(raw)
            elif item.text is not None:
                text = item.text
            else:
                text = "" if isinstance(raw, Exception) else _letter_text(raw)
            # every column as SQLite can store it: a lone surrogate anywhere in the
            # input (its text, its id, a file name) must not cost the batch
            text = _storable(text.rstrip("\n"))
            reason, origin = _storable(reason), _storable(item.origin)
            if event_source is not None:
                event_source = _storable(event_source)
            if event_id is not None:
                event_id = _storable(event_id)
            digest = hashlib.sha256(
                f"{origin}\0{item.line}\0{text}\0{reason}".encode()).hexdigest()
            dead.append((origin, item.line, reason, text, int(item.retriable),
                         event_source, event_id, digest, received))
            if item.resend_to:
                resend.append((digest, _storable(item.resend_to)))
            if note is not None:
                note(id(item), ("dead_lettered", reason))
            where = f"{origin}:{item.line}" if item.line is not None else origin
            if len(report.problems) < MAX_PROBLEMS:
                report.problems.append(f"{where}: {reason}")

        for item in batch:
            raw = item.raw
            if isinstance(raw, Exception):
                reject(item, str(raw))
                continue
            if isinstance(raw, Mapping) and raw.get("type") == "identify":
                try:
                    steps.append(_identify_request(raw))
                except EventError as exc:
                    reject(item, str(exc))
                    continue
                if note is not None:
                    note(id(item), ("identified", None))
                continue
            try:
                steps.append((Event.from_dict(raw, source=source), item))
            except EventError as exc:
                reject(item, str(exc))

        landed = False
        try:
            with self._writing(ingest=True):
                self.follow_rules()
                if also is not None:
                    also()
                self._apply_steps(steps, report, reject, outcomes, note)
                if dead:
                    self.db.conn.executemany(
                        "INSERT OR IGNORE INTO dead_letters (origin, line, reason, raw,"
                        " retriable, source, event_id, digest, received_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", dead)
                if resend:
                    self.db.conn.executemany(
                        "INSERT OR IGNORE INTO dead_letter_sources (seq, source)"
                        " SELECT seq, ? FROM dead_letters WHERE digest = ?",
                        [(name, digest) for digest, name in resend])
                if self._landed and self.db.execute(
                        "SELECT 1 FROM dead_letters WHERE event_id IS NOT NULL LIMIT 1"
                        ).fetchone():
                    # an event of this batch that landed at last (a fixed line) ends
                    # its letters
                    self.db.conn.executemany(
                        "DELETE FROM dead_letters WHERE source = ? AND event_id = ?",
                        [row[:2] for row in self._landed])
            landed = True
        finally:
            self._forget_loaded(keep=landed)
        report.dead_lettered = len(dead)
        return report

    def _apply_steps(self, steps: list[Any], report: IngestReport, reject: Any,
                     outcomes: list[Outcome] | None, note: Any = None) -> None:
        events = [s[0] for s in steps if isinstance(s, tuple)]
        aliases = self._aliases_of({ev.customer for ev in events} | {
            name for s in steps if isinstance(s, _Identify) for name in s.names()})
        self._mark_seen(events)
        self._load({aliases.get(ev.customer, ev.customer) for ev in events})
        touched: dict[str, None] = {}
        new_events: list[tuple[Any, ...]] = []
        ledger: list[tuple[Any, ...]] = []  # rows, written once the batch is known
        decisions: list[Decision] = []
        segment: list[tuple[Event, Incoming]] = []
        ledger_rows = self._ledger_rows

        def run_segment() -> None:
            segment.sort(key=lambda s: (s[0].ts, s[0].id, s[0].source))
            replayed = self._replay_late(segment, aliases)
            for ev, item in segment:
                canonical = aliases.get(ev.customer, ev.customer)
                if canonical != ev.customer:
                    ev = attrs.evolve(ev, customer=canonical)
                if id(item) in replayed:
                    outcome = replayed[id(item)]
                    self._replayed = canonical  # (its whole ledger is written again)
                else:
                    outcome = None
                try:
                    props = _to_json(ev.props)
                except (TypeError, ValueError) as exc:
                    reject(item, f"event {ev.id}: a property value is not JSON: {exc}")
                    continue
                except RecursionError:  # (given through the API: JSON input is bounded)
                    reject(item, f"event {ev.id}: a property value is nested too deeply")
                    continue
                if outcome is None:
                    if canonical not in self._customers and canonical not in self._absent:
                        self._load([canonical])
                    self._replayed = None
                    try:
                        outcome = Engine._process(self, ev)  # (checked as it was parsed)
                    except EventError as exc:
                        reject(item, str(exc))
                        continue
                    except OverflowError:
                        reject(item, f"event {ev.id}: a number too large to count with")
                        continue
                full = self._full_ledgers.get(canonical)
                if full is not None and self._replayed != canonical:
                    full.extend(outcome.ledger)  # after a recomputation in this batch
                if outcomes is not None:
                    outcomes.append(outcome)
                if note is not None:
                    note(id(item), ("duplicate" if outcome.duplicate else "new", outcome))
                if outcome.duplicate:
                    report.duplicates += 1
                    continue
                report.ingested += 1
                touched[canonical] = None
                at = ev.at.isoformat()
                new_events.append((ev.source, ev.id, canonical, ev.type, at, ev.ts, props))
                if canonical not in self._rewrite:
                    ledger_rows(outcome.ledger, ledger, ev.at, ev.ts, at)
                decisions.extend(outcome.decisions)
            segment.clear()

        for step in steps:
            if isinstance(step, tuple):
                segment.append(step)
                continue
            run_segment()
            report.identified += 1
            report.merged += self._identify(step, aliases, touched, decisions)
        run_segment()

        self._landed = new_events  # (source, id, ...) of each event that landed
        if self._gone:  # events of a customer merged since: under the merged one
            new_events = [(*r[:2], aliases.get(r[2], r[2]), *r[3:]) for r in new_events]
        self.db.conn.executemany(
            "INSERT INTO events (source, id, customer, type, at, ts, props)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", new_events)

        # a customer recomputed in this batch has its whole ledger written again
        skip = self._rewrite | self._gone
        self._write_ledger([r for r in ledger if r[0] not in skip] if skip else ledger)
        self._insert_decisions(d for d in decisions if d.customer not in self._rewrite)
        self._save(touched, rewrite=[cid for cid in self._rewrite if cid in touched])
        report.decisions += len(decisions)

    def _replay_late(self, segment: list[tuple[Event, Incoming]],
                     aliases: dict[str, str]) -> dict[int, Outcome]:
        """The outcomes (by ``id`` of their item) of the segment's late events, for
        each customer with several: recomputed once for all of them (see
        ``Engine._replay_all``). A group that fails is left to the events one by one,
        which names the event at fault."""
        groups: dict[str, list[tuple[Event, Incoming]]] = {}
        taken: set[tuple[str, str]] = set()
        customers = self._customers
        for ev, item in segment:
            canonical = aliases.get(ev.customer, ev.customer)
            c = customers.get(canonical)  # (loaded for the batch: none, nothing is late)
            if c is None or not self._late(c, ev):
                continue
            seen = self._seen if not ev.source else self._seen_from.get(ev.source, {})
            if ev.id in seen or (ev.source, ev.id) in taken:
                continue
            if canonical != ev.customer:
                ev = attrs.evolve(ev, customer=canonical)
            taken.add((ev.source, ev.id))
            groups.setdefault(canonical, []).append((ev, item))
        found: dict[int, Outcome] = {}
        for group in groups.values():
            if len(group) < 2:
                continue
            try:  # (a replay that fails changed nothing: it works on a fresh copy)
                done = self._replay_all([ev for ev, _ in group])
            except (EventError, OverflowError):
                continue
            found.update((id(item), done[id(ev)]) for ev, item in group)
        return found

    def _mark_seen(self, events: list[Event]) -> None:
        """Event ids the database already holds count as seen by the engine."""
        by_source: dict[str, list[str]] = {}
        for ev in events:
            by_source.setdefault(ev.source, []).append(ev.id)
        for src, ids in by_source.items():
            seen = self._seen if not src else self._seen_from.setdefault(src, {})
            for (event_id,) in self._rows_in(
                    "SELECT id FROM events WHERE source = ? AND id IN ({})",
                    list(dict.fromkeys(ids)), before=(src,)):
                seen[event_id] = None

    def _aliases_of(self, names: Iterable[str]) -> dict[str, str]:
        return dict(self._rows_in("SELECT alias, customer FROM aliases WHERE alias IN ({})",
                                  list(names)))

    # -- identity ----------------------------------------------------------------------

    def _identify(self, request: _Identify, aliases: dict[str, str],
                  touched: dict[str, None], decisions: list[Decision]) -> int:
        """Link ``request.aliases`` to its customer; merge customers with history."""
        canonical = aliases.get(request.customer, request.customer)
        merged = 0
        for name in request.aliases:
            other = aliases.get(name, name)
            if other == canonical:
                continue
            if not request.move and other != name:
                # a link another customer holds is not taken on one platform's word
                # (an address typed at a checkout): the alias stays with them
                continue
            # everything that pointed at `other` now points at `canonical`
            self.db.execute("UPDATE aliases SET customer = ? WHERE customer = ?",
                            [canonical, other])
            for alias, target in list(aliases.items()):
                if target == other:
                    aliases[alias] = canonical
            for link in {name, other}:
                self.db.execute(
                    "INSERT INTO aliases (alias, customer) VALUES (?, ?)"
                    " ON CONFLICT(alias) DO UPDATE SET customer = excluded.customer",
                    [link, canonical])
                aliases[link] = canonical
            self._load([other, canonical])
            if other in self._customers:
                self._merge(other, canonical, touched)
                merged += 1
        return merged

    def _merge(self, other: str, canonical: str, touched: dict[str, None]) -> None:
        """Fold customer ``other`` into ``canonical``: both logs are replayed as one
        history; what was decided for either stays decided."""
        gone = self._customers.pop(other)
        keep = self._customers.get(canonical)
        self._gone.add(other)
        rows = list(self._history(gone))
        known: dict[str, Decision] = {}
        horizon = gone.horizon
        if keep is not None:
            rows.extend(self._history(keep))
            known.update(decided(keep))
            horizon = max(horizon, keep.horizon)
        for d in decided(gone).values():
            # the same cause, trigger and action, seen from the merged customer
            key = decision_id(canonical, d.rule, d.trigger, d.action)
            kept = known.get(key)
            if kept is None:
                known[key] = d
                continue
            # both decided the same: one stays, a delivered one first
            delivered = self._delivered([kept.id, d.id])
            if d.id not in delivered:
                self._drop.add(d.id)
            elif kept.id not in delivered:
                self._drop.add(kept.id)
                known[key] = d
            else:
                known[d.id] = d  # both delivered: both stay, as they are
        ledger: list[LedgerEntry] = []
        fresh = self._rebuild(canonical, rows, horizon=horizon, ledger=ledger)
        self._reconcile(known, fresh)
        self._customers[canonical] = fresh
        self._recomputed(fresh, ledger)
        touched[canonical] = None
        touched.pop(other, None)
        self.db.execute("UPDATE events SET customer = ? WHERE customer = ?", [canonical, other])
        self.db.execute("UPDATE decisions SET customer = ? WHERE customer = ?",
                        [canonical, other])
        self.db.execute("DELETE FROM ledger WHERE customer = ?", [other])
        self.db.execute("DELETE FROM customers WHERE id = ?", [other])

    def resolve(self, customer: str) -> str:
        """The canonical id of a customer identifier (itself if not an alias)."""
        row = self.db.execute("SELECT customer FROM aliases WHERE alias = ?",
                              [customer]).fetchone()
        return row[0] if row else customer

    # -- time ----------------------------------------------------------------------------

    def tick(self, now: str | datetime) -> list[Decision]:
        """Apply what time did up to ``now`` to the customers due (found through the
        index on ``next_change_at``), a transaction per chunk; returns the decisions."""
        t = _moment(now)
        due = [cid for (cid,) in self.db.execute(
            "SELECT id FROM customers WHERE next_change_at <= ? ORDER BY next_change_at, id",
            [t])]
        made: list[Decision] = []
        for start in range(0, len(due), _CHUNK):
            part = due[start:start + _CHUNK]
            try:
                with self._writing():
                    self._load(part)
                    found: list[Decision] = []
                    for cid in part:
                        found.extend(self._tick_one(self._customers[cid], t))
                    self._insert_decisions(found)
                    self._save(part)
            finally:
                self._forget_loaded()
            made.extend(found)
        with self._writing():  # how far time was applied: a rules change replays to it
            self.db.execute(
                "INSERT INTO meta (key, value) VALUES ('ticked_to', ?) ON CONFLICT(key)"
                " DO UPDATE SET value = max(value, excluded.value)", [t])
        made.sort(key=lambda d: (d.at, d.id))
        return made

    def _ticked_to(self) -> float:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'ticked_to'").fetchone()
        return -math.inf if row is None else float(row[0])

    # -- reading -----------------------------------------------------------------------

    def capital(self, customer: str, at: str | datetime | None = None) -> float | None:
        canonical = self.resolve(customer)
        try:
            self._load([canonical])
            return super().capital(canonical, at)
        finally:
            self._forget_loaded()

    def profile(self, customer: str, at: str | datetime) -> dict[str, Any]:
        """What is held about a customer at ``at``, for people: capital, level, last
        contact and consent as they were then, and the ledger that explains that
        capital (what time did since the last event comes last, marked as not
        settled). Raises StoreError for a customer the database does not know."""
        canonical = self.resolve(customer)
        if self.db.execute("SELECT 1 FROM customers WHERE id = ?", [canonical]).fetchone() \
                is None:
            raise UnknownCustomer(f"unknown customer {customer!r}")
        moment = at if isinstance(at, datetime) else parse_instant(at)
        ledger: list[LedgerEntry] = []
        state = self.as_of(canonical, moment, ledger=ledger)
        assert state is not None
        t = moment.timestamp()
        opened = state.opened_at is not None and state.opened_at <= t
        return {
            "customer": canonical,
            "aliases": self.identifiers(canonical)[1:],
            "at": moment.isoformat(),
            "capital": capital_at(state, self._rules, t) if opened else None,
            "level": state.level(self._rules),
            "last_contact": from_seconds(state.last_contact).isoformat() if opened else None,
            "consent": state.consent,
            "ledger": [e.to_dict() for e in ledger],
        }

    def as_of(self, customer: str, at: str | datetime,
              ledger: list[LedgerEntry] | None = None) -> Customer | None:
        canonical = self.resolve(customer)
        try:
            self._load([canonical])
            return super().as_of(canonical, at, ledger=ledger)
        finally:
            self._forget_loaded()

    def states(self, customer: str, until: str | datetime) -> Iterator[tuple[float, Customer]]:
        canonical = self.resolve(customer)
        try:
            self._load([canonical])
            yield from super().states(canonical, until)
        finally:
            self._forget_loaded()

    def event_times(self, customer: str) -> list[float]:
        canonical = self.resolve(customer)
        try:
            self._load([canonical])
            return super().event_times(canonical)
        finally:
            self._forget_loaded()

    def level(self, customer: str) -> str | None:
        row = self.db.execute("SELECT level FROM customers WHERE id = ?",
                              [self.resolve(customer)]).fetchone()
        return row[0] if row else None

    def next_change(self, customer: str) -> float:
        row = self.db.execute("SELECT next_change_at FROM customers WHERE id = ?",
                              [self.resolve(customer)]).fetchone()
        return math.inf if row is None or row[0] is None else row[0]

    def explain(self, customer: str, at: str | datetime | None = None) -> list[LedgerEntry]:
        """The stored ledger of one customer, in time order; ``at`` a moment, the
        ledger that explains the capital then (see ``Engine.explain``)."""
        if at is not None:
            ledger: list[LedgerEntry] = []
            self.as_of(customer, at, ledger=ledger)
            return ledger
        rows = self.db.execute(
            "SELECT customer, rule, points, at, event_id, category, reason FROM ledger"
            " WHERE customer = ? ORDER BY seq", [self.resolve(customer)])
        return [LedgerEntry(c, rule, points, datetime.fromisoformat(at), event_id, cat, why)
                for c, rule, points, at, event_id, cat, why in rows]

    def decisions(self, customer: str | None = None, *, status: str | None = None,
                  since: str | datetime | None = None, limit: int | None = None
                  ) -> list[Decision]:
        """Decisions in the outbox (of one customer, or all), oldest first (the first
        ``limit`` of them)."""
        where, args = ["customer IS NOT NULL"], []
        if customer is not None:
            where.append("customer = ?")
            args.append(self.resolve(customer))
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if since is not None:
            where.append("ts >= ?")
            args.append(_moment(since))
        rows = self.db.execute(
            "SELECT id, customer, rule, action, params, at, kind, via, trigger, status, reason"
            f" FROM decisions WHERE {' AND '.join(where)} ORDER BY ts, id LIMIT ?",
            [*args, -1 if limit is None else limit])
        return [decision_of(row) for row in rows]

    def customers(self) -> Iterator[str]:
        for (cid,) in self.db.execute("SELECT id FROM customers ORDER BY id"):
            yield cid

    def snapshot(self, customer: str) -> Customer | None:
        """A copy of one customer's state as stored (None if unknown)."""
        row = self.db.execute("SELECT state FROM customers WHERE id = ?",
                              [self.resolve(customer)]).fetchone()
        return None if row is None else self._decode(customer, row[0])

    # -- rules ---------------------------------------------------------------------------

    def use_rules(self, rules: RuleSet | str | Path) -> bool:
        """Switch to another rule-file version: validated first (a broken one raises
        RuleFileError and changes nothing), recorded, then every customer is
        recomputed from their events. Returns False if it was already in use."""
        new = rules if isinstance(rules, RuleSet) else load_rules(rules)
        if _rules_hash(new) == _rules_hash(self._rules) and self._active_rules() is not None:
            return False
        old_rules = self._rules
        self._derive(new)
        try:
            ids = list(self.customers())
            ticked = self._ticked_to()
            # one transaction: every customer moves to the new version, or none does
            with self._writing():
                for start in range(0, len(ids), _CHUNK):
                    part = ids[start:start + _CHUNK]
                    try:
                        self._load(part)
                        for cid in part:
                            old = self._customers[cid]
                            fresh = self._rebuild(cid, self._history(old),
                                                  horizon=max(old.horizon, ticked))
                            # the outbox follows the new history, as after a late event
                            self._reconcile(decided(old), fresh)
                            self._customers[cid] = fresh
                            self._schedule(fresh)
                            self._rewrite.add(cid)
                        self._save(part, rewrite=part)
                    finally:
                        self._forget_loaded()
                self._activate(new)
        except BaseException:
            self._derive(old_rules)
            raise
        return True

    def rule_versions(self) -> list[dict[str, Any]]:
        """Every rules version used, oldest first: hash, files, since when, active."""
        rows = self.db.execute(
            "SELECT hash, files, used_from, active FROM rule_versions ORDER BY rowid")
        return [{"hash": h[:16], "files": _file_names(files), "used_from": used,
                 "active": bool(active)} for h, files, used, active in rows]

    # -- dead letters ---------------------------------------------------------------------

    def dead_letters(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Input that could not be used, oldest first (the first ``limit``)."""
        rows = self.db.execute(
            "SELECT seq, origin, line, reason, raw, retriable, received_at, s.source"
            " FROM dead_letters LEFT JOIN dead_letter_sources AS s USING (seq)"
            " ORDER BY seq LIMIT ?", [-1 if limit is None else limit])
        return [dict(zip(("seq", "origin", "line", "reason", "raw", "retriable",
                          "received_at", "resend_to"), r, strict=True)) for r in rows]

    def retry_dead_letters(self, resend: Any = None) -> IngestReport:
        """Ingest the dead letters again (after a fix of the input or the rules): those
        that now go in leave the table, the others stay with their new reason.

        A letter an event source could not use yet (``resend_to``) is handed back to
        it: ``resend(name, text)`` returns the source's events for that body (raising
        as its ``parse`` does, ``webevents.Unavailable`` when it still cannot); without
        ``resend`` such letters stay as they are."""
        report = IngestReport()
        letters = self.dead_letters()
        waiting = [d for d in letters if d["retriable"] and d["resend_to"] and resend is None]
        report.dead_lettered = sum(1 for d in letters if not d["retriable"]) + len(waiting)
        letters = [d for d in letters if d["retriable"] and d not in waiting]
        for start in range(0, len(letters), self.batch_size):
            part = letters[start:start + self.batch_size]
            items = []
            for letter in part:
                if letter["resend_to"]:
                    items.extend(_resent(letter, resend))
                    continue
                items.append(Incoming(raw=parse_json_line(letter["raw"]),
                                      origin=letter["origin"], line=letter["line"],
                                      text=letter["raw"]))
            seqs = [(letter["seq"],) for letter in part]
            # the old letters go in the same transaction as their new attempt
            report.add(self._ingest_batch(items, "", also=lambda seqs=seqs: (
                self.db.conn.executemany("DELETE FROM dead_letters WHERE seq = ?", seqs))))
        return report

    # -- privacy ---------------------------------------------------------------------------

    def identifiers(self, customer: str) -> list[str]:
        canonical = self.resolve(customer)
        names = [canonical] + [a for (a,) in self.db.execute(
            "SELECT alias FROM aliases WHERE customer = ? ORDER BY alias", [canonical])]
        return list(dict.fromkeys(names))

    def export(self, customer: str) -> dict[str, Any]:
        """Everything held about one customer, as plain JSON-ready values."""
        canonical = self.resolve(customer)
        events = [
            {"source": s, "id": i, "type": k, "at": at, **json.loads(props)}
            for s, i, k, at, props in self.db.execute(
                "SELECT source, id, type, at, props FROM events WHERE customer = ?"
                " ORDER BY ts, id, source", [canonical])]
        snapshot = self.db.execute(
            "SELECT opened_at, level, capital, last_ts, next_change_at FROM customers"
            " WHERE id = ?", [canonical]).fetchone()
        held = self.snapshot(canonical)
        names = self.identifiers(canonical)
        return {
            "customer": canonical,
            "aliases": names[1:],
            "state": None if snapshot is None else {
                "opened_at": _iso(snapshot[0]), "level": snapshot[1],
                "capital_at_last_event": snapshot[2], "last_event_at": _iso(snapshot[3]),
                "next_change_at": _iso(snapshot[4]),
                "consent": held.consent if held else None,
                "purchases": held.purchases if held else None,
                "spent": held.spent if held else None,
                "last_contact_at": _iso(held.last_contact)
                if held and held.opened_at is not None else None},
            "events": events,
            "ledger": [e.to_dict() for e in self.explain(canonical)],
            "decisions": [d.to_dict() for d in self.decisions(canonical)],
            "dead_letters": list(filter(_Mentions(names), self.dead_letters())),
        }

    def forget(self, customer: str) -> dict[str, int]:
        """Erase a customer: events, snapshot, ledger, aliases, dead letters naming
        them, and the payload of their decisions (kept as anonymous counts). The
        file is vacuumed and its write-ahead log truncated, so none of their
        identifiers remains in it. Returns what was erased."""
        canonical = self.resolve(customer)
        names = self.identifiers(canonical)
        erased: dict[str, int] = {}
        with self._writing():
            execute = self.db.conn.execute
            erased["events"] = execute("DELETE FROM events WHERE customer = ?",
                                       [canonical]).rowcount
            erased["snapshots"] = execute("DELETE FROM customers WHERE id = ?",
                                          [canonical]).rowcount
            erased["ledger_entries"] = execute("DELETE FROM ledger WHERE customer = ?",
                                       [canonical]).rowcount
            erased["aliases"] = execute("DELETE FROM aliases WHERE customer = ?",
                                        [canonical]).rowcount
            ids = [i for (i,) in execute("SELECT id FROM decisions WHERE customer = ?",
                                         [canonical])]
            for did in ids:  # the id is derived from the customer's: replaced too
                # a delivery error can name the customer or their address; the engine's
                # own reasons (consent, pressure, holdout) are anonymous and stay
                # the statuses stay, as anonymous counts; without a customer, one not
                # delivered yet never will be (the delivery loop passes it by)
                execute("UPDATE decisions SET id = ?, customer = NULL, params = NULL,"
                        " trigger = NULL, reason = CASE WHEN status IN ('suppressed',"
                        " 'held_out') THEN reason END, next_try = NULL, lease_until = NULL"
                        " WHERE id = ?",
                        ["forgotten:" + hashlib.sha256(did.encode() + _salt()).hexdigest()[:32],
                         did])
            erased["decisions"] = len(ids)
            mentions = _Mentions(names)
            doomed = [d["seq"] for d in self.dead_letters() if mentions(d)]
            for seq in doomed:
                execute("DELETE FROM dead_letters WHERE seq = ?", [seq])
            erased["dead_letters"] = len(doomed)
            if erased["snapshots"] or erased["events"]:
                execute("INSERT INTO counters (name, value) VALUES ('forgotten_customers', 1)"
                        " ON CONFLICT(name) DO UPDATE SET value = value + 1")
        try:
            self.scrub(f"{canonical} is erased (committed), but",
                       again=f"retention forget {canonical}")
        except ScrubPending as exc:
            exc.erased = erased
            raise
        return erased

    def scrub_pending(self) -> bool:
        """Whether an earlier erasure could not empty the write-ahead log."""
        return self.db.execute("SELECT 1 FROM meta WHERE key = 'scrub_pending'").fetchone() \
            is not None

    def scrub(self, what: str = "the file is vacuumed, but", *,
              again: str = "retention forget") -> None:
        """VACUUM, then empty the write-ahead log: deleted data leaves the files.

        Marked pending first, so a scrub that cannot finish is run again by the next
        one. VACUUM needs free space about the size of the file (a full disk makes it
        fail), and a reader elsewhere can hold old pages in the log (the busy timeout
        waits for it first): either raises ScrubPending, which says how to finish."""
        with self._writing():
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('scrub_pending', 1)")
        try:
            self.db.execute("VACUUM")
        except sqlite3.Error as exc:
            # what the erasure overwrote (secure_delete) goes back into the file at
            # least, if there is room for that
            with suppress(sqlite3.Error):
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            raise ScrubPending(
                f"{self.path}: {what} the file could not be vacuumed ({exc}): it keeps its "
                "size, and traces of what was erased may stay in its free space until it "
                "is. VACUUM needs free space about the size of the database (in its "
                f"folder and the temporary folder): make room, then run `{again}` again "
                "(any later forget finishes it first)") from None
        busy = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if not busy:
            with self._writing():
                self.db.execute("DELETE FROM meta WHERE key = 'scrub_pending'")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            raise ScrubPending(
                f"{self.path}: {what} another process has the database open and old data "
                f"stays in its write-ahead log until it closes: run `{again}` again then")

    # -- reports -------------------------------------------------------------------------

    def at_risk(self, level: str | None = None, *, now: str | datetime | None = None,
                limit: int | None = None) -> list[dict[str, Any]]:
        """Customers whose capital at ``now`` is below a level's threshold (default:
        below any level's), lowest capital first, with that capital and the level they
        are in then, as ``customer ID --at now`` shows them. ``now`` defaults to the
        latest moment the database knows of (its latest event or tick): the engine
        never reads the clock.

        Only customers who may be below are read: a threshold crossed since a
        customer's latest update would have fired a level, so it is either in the
        level already or due by ``now`` (``next_change_at``). A moment before the
        latest tick, or before customers' latest events, replays those customers."""
        levels = self._rules.levels
        names = [lv.name for lv in levels]
        if level is not None and level not in names:
            raise RetentionError(f"unknown level {level!r}; levels: {', '.join(names)}")
        if not levels:
            return []
        edge = max(lv.below for lv in levels if level is None or lv.name == level)
        t = self._latest() if now is None else _moment(now)
        found = []
        candidates = self._at_risk_candidates(t, edge)
        for c in self._states_at(candidates, t):
            capital = capital_at(c, self._rules, t)
            if capital < edge:
                found.append({"customer": c.id, "level": c.level(self._rules),
                              "capital": capital, "last_event_at": _iso(c.last[0]),
                              "last_contact_at": _iso(c.last_contact)})
        found.sort(key=lambda r: (r["capital"], r["customer"]))
        return found[:limit] if limit else found

    def capitals(self, now: str | datetime | None = None) -> Iterator[tuple[str, str | None,
                                                                           float]]:
        """(customer, level, capital) at ``now`` of every customer open by then, in id
        order, as ``at-risk`` and ``customer ID --at now`` compute them; ``now``
        defaults to the latest moment the database knows of. (The capital
        distribution of ``retention plot --distribution`` and the dashboard.)"""
        t = self._latest() if now is None else _moment(now)
        ids = [cid for (cid,) in self.db.execute(
            "SELECT id FROM customers WHERE opened_at <= ? ORDER BY id", [t])]
        for c in self._states_at(ids, t):
            yield c.id, c.level(self._rules), capital_at(c, self._rules, t)

    def _states_at(self, ids: list[str], t: float) -> Iterator[Customer]:
        """Copies of the customers ``ids`` as they are at ``t`` (time applied to their
        levels), those open by then only; nothing is saved."""
        for start in range(0, len(ids), _CHUNK):
            part = ids[start:start + _CHUNK]
            rows = dict(self._rows_in("SELECT id, state FROM customers WHERE id IN ({})",
                                      part))
            for cid in part:
                if cid not in rows:
                    continue
                c = self._decode(cid, rows[cid])
                if c.last is not None and c.last[0] <= t and c.level_time <= t:
                    self._advance(c, t, include_end=True)  # (a copy: nothing is saved)
                else:
                    c = self.as_of(cid, from_seconds(t))
                    assert c is not None
                if c.opened_at is not None and c.opened_at <= t:
                    yield c

    def _latest(self) -> float:
        """The latest moment the database knows of: its latest event, or tick."""
        row = self.db.execute("SELECT max(last_ts) FROM customers").fetchone()
        return max(self._ticked_to(), -math.inf if row[0] is None else row[0])

    def _at_risk_candidates(self, t: float, edge: float) -> list[str]:
        """The customers whose capital at ``t`` may be below ``edge``: in a level, due
        by ``t``, or with events after ``t``; all open ones when ``t`` is before the
        latest tick (levels may have moved since) or when a level below ``edge`` is
        above the initial capital (customers opened under it are not armed for it, so
        crossing it fires nothing)."""
        initial = self._rules.capital.initial
        if t < self._ticked_to() or any(
                initial < lv.below <= edge for lv in self._rules.levels):
            sql, args = "SELECT id FROM customers WHERE opened_at <= ?", [t]
        else:
            sql = ("SELECT id FROM customers WHERE level IS NOT NULL AND opened_at <= ?"
                   " UNION SELECT id FROM customers WHERE next_change_at <= ? AND opened_at <= ?"
                   " UNION SELECT id FROM customers WHERE last_ts > ? AND opened_at <= ?")
            args = [t, t, t, t, t]
        return [cid for (cid,) in self.db.execute(sql, args)]

    def stats(self) -> dict[str, Any]:
        """Customers by level, capital distribution, decisions by action and status,
        and the forces by category (points added against points taken)."""
        db = self.db
        by_level = {(lvl if lvl is not None else ("none" if opened else "prospect")): n
                    for lvl, opened, n in db.execute(
                        "SELECT level, opened_at IS NOT NULL, count(*) FROM customers"
                        " GROUP BY 1, 2 ORDER BY 1, 2")}
        capitals = [c for (c,) in db.execute(
            "SELECT capital FROM customers WHERE capital IS NOT NULL ORDER BY capital")]
        distribution: dict[str, Any] = {"customers": len(capitals)}
        if capitals:
            for name, q in (("min", 0.0), ("p10", 0.1), ("p25", 0.25), ("median", 0.5),
                            ("p75", 0.75), ("p90", 0.9), ("max", 1.0)):
                distribution[name] = capitals[min(len(capitals) - 1,
                                                  int(q * (len(capitals) - 1) + 0.5))]
            distribution["mean"] = sum(capitals) / len(capitals)
        decisions = [{"action": a, "status": s, "count": n} for a, s, n in db.execute(
            "SELECT action, status, count(*) FROM decisions GROUP BY 1, 2 ORDER BY 1, 2")]
        forces = [{"category": cat, "added": added, "taken": taken, "entries": n}
                  for cat, added, taken, n in db.execute(
                      "SELECT category, sum(max(points, 0)), sum(min(points, 0)), count(*)"
                      " FROM ledger GROUP BY category ORDER BY category")]
        counters = dict(db.execute("SELECT name, value FROM counters"))
        return {
            "customers_by_level": by_level,
            "capital": distribution,
            "decisions": decisions,
            "forces": forces,
            "events": db.execute("SELECT count(*) FROM events").fetchone()[0],
            "dead_letters": db.execute("SELECT count(*) FROM dead_letters").fetchone()[0],
            "forgotten_customers": counters.get("forgotten_customers", 0),
        }


class _Transaction:
    """``with`` one SQLite transaction; SQLite errors surface as StoreError."""

    def __init__(self, store: StoredEngine, ingest: bool):
        self.store = store
        self.ingest = ingest

    def __enter__(self) -> None:
        try:
            self.store.db.conn.execute("BEGIN IMMEDIATE")
            self.store._check_kept(self.ingest)
        except sqlite3.Error as exc:
            with suppress(sqlite3.Error):
                self.store.db.conn.execute("ROLLBACK")
            raise _explain_open_error(self.store.path, exc) from None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        self.store._keeping = False
        conn = self.store.db.conn
        if kind is None:
            try:
                conn.execute("COMMIT")
                return False
            except sqlite3.Error as error:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise _explain_open_error(self.store.path, error) from None
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise _explain_open_error(self.store.path, exc) from None
        return False


@attrs.frozen
class _Identify:
    customer: str
    aliases: tuple[str, ...]
    #: False: an alias that already names another customer stays theirs
    move: bool = True

    def names(self) -> list[str]:
        return [self.customer, *self.aliases]


def _identify_request(raw: Mapping[str, Any]) -> _Identify:
    customer = raw.get("customer")
    if not isinstance(customer, str) or not customer:
        raise EventError("identify: missing field 'customer'", field="customer",
                         event_id=raw.get("id"))
    aliases = raw.get("aliases")
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise EventError("identify: 'aliases' must be a list of identifiers",
                         field="aliases", event_id=raw.get("id"))
    for field, name in (("customer", customer), *(("aliases", a) for a in aliases)):
        problem = text_problem(name)
        if problem is not None:
            raise EventError(f"identify: field {field!r}: {problem}", field=field)
    move = raw.get("move_aliases", True)
    if not isinstance(move, bool):
        raise EventError("identify: 'move_aliases' must be true or false",
                         field="move_aliases", event_id=raw.get("id"))
    return _Identify(customer=customer, aliases=tuple(a for a in aliases if a != customer),
                     move=move)


_SALT: list[bytes] = []


def _salt() -> bytes:
    """Random bytes per process, so a forgotten decision's new id leads nowhere."""
    if not _SALT:
        import os
        _SALT.append(os.urandom(16))
    return _SALT[0]


def _file_names(files: str) -> str:
    try:
        return ", ".join(str(entry[0]) for entry in json.loads(files))
    except (ValueError, TypeError, IndexError, KeyError):
        return "(damaged)"


class _Mentions:
    """Whether a dead letter names one of a customer's identifiers, however its input
    spelled it: as a JSON string or inside free text (a note, a subject line), with
    JSON escapes (``"cust\\u002d1"``) or without, in a CSV row, in its reason. An
    ``email:`` identifier also matches its bare address, in any case.

    An identifier inside a longer one (``c1`` in ``c10``, ``ann@example.com`` in
    ``joann@example.com``) is another identifier: a match stands apart from the
    letters, digits and joining marks around it."""

    #: before and after a match: no character that would make it a longer identifier
    _BEFORE = r"(?<![\w.@+-])"
    _AFTER = r"(?![\w@+-]|\.\w)"

    def __init__(self, names: list[str]):
        self.names = set(names)
        parts = [re.escape(n) for n in sorted(self.names, key=len, reverse=True)]
        parts += [f"(?i:{re.escape(n[len('email:'):])})" for n in names
                  if n.lower().startswith("email:") and len(n) > len("email:")]
        self.pattern = re.compile(f"{self._BEFORE}(?:{'|'.join(parts)}){self._AFTER}")

    def __call__(self, letter: Mapping[str, Any]) -> bool:
        raw = letter["raw"] or ""
        search = self.pattern.search
        if search(raw) or search(letter["reason"] or ""):
            return True
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON as a whole: read its escapes
            return bool(search(_unescaped(raw)))
        return any(search(text) for text in _strings(value)) or self._numbered(value)

    def _numbered(self, value: Any) -> bool:
        """A customer (or an identify's alias) written as a number."""
        if not isinstance(value, dict):
            return False
        named = [value.get("customer"), value.get("subject"),
                 *(value.get("aliases") if isinstance(value.get("aliases"), list) else ())]
        return any(isinstance(v, int) and not isinstance(v, bool) and str(v) in self.names
                   for v in named)


def _strings(value: Any) -> Iterator[str]:
    """Every string of a JSON value, keys included, however deep (without recursion)."""
    pending = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            yield from value
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


_JSON_ESCAPE = re.compile(r'\\(?:u([0-9a-fA-F]{4})|(["\\/bfnrt]))')
_ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
            "t": "\t"}


def _unescaped(text: str) -> str:
    """``text`` with every JSON escape read, wherever it is (for input that is not
    JSON as a whole: a truncated line still spells its strings as JSON does)."""
    out = _JSON_ESCAPE.sub(lambda m: chr(int(m[1], 16)) if m[1] else _ESCAPED[m[2]], text)
    # an escaped surrogate pair is one character; a lone surrogate matches nothing
    return out.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _iso(ts: float | None) -> str | None:
    """A stored time as ISO-8601; None for none, and for one past the years a datetime
    holds (a next change that a drain of a tiny rate puts in the year 30000: as
    never, since no tick can reach it)."""
    if ts is None:
        return None
    try:
        return from_seconds(ts).isoformat()
    except (OverflowError, ValueError, OSError):
        return None


def decision_of(row: tuple[Any, ...]) -> Decision:
    did, customer, rule, action, params, at, kind, via, trigger, status, reason = row
    return Decision(id=did, customer=customer, rule=rule, action=action,
                    params=json.loads(params) if params else {},
                    at=datetime.fromisoformat(at), kind=kind, via=via, trigger=trigger or "",
                    status=status, reason=reason)


__all__ = ["BATCH", "UNDELIVERED", "Incoming", "IngestReport", "ScrubPending", "StoreError",
           "StoredEngine", "UnknownCustomer"]
