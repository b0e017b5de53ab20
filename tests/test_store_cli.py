"""The store's command line as a user runs it: real databases, real files, real processes.

`retention ingest` is killed mid-way and run again; bad input gets one clear line;
every listing parses in each machine format.
"""

import csv
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from retention.cli import cli

ROOT = Path(__file__).resolve().parent.parent
RETAIL = ROOT / "examples" / "rules" / "retail.yaml"
EVENTS = ROOT / "examples" / "events" / "retail.jsonl"
COUNTS = re.compile(r"^ingested (\d+), duplicates (\d+), dead-lettered (\d+), decisions (\d+)$")
#: after the last event of examples/events/retail.jsonl (2026-06-30)
END = "2026-07-01T00:00:00Z"


def invoke(*args, input=None, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env)


def counts(output):
    """(ingested, duplicates, dead-lettered, decisions) of an ingest's last line."""
    found = COUNTS.match(output.strip().splitlines()[-1])
    assert found, output
    return tuple(int(n) for n in found.groups())


def failed_cleanly(result, code=1):
    """Exit ``code`` with a message, not a crash (CliRunner keeps a crash in
    ``exception`` instead of printing its traceback, so that is checked too)."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def dump(db):
    """Every table of a database, in a stable order."""
    with closing(sqlite3.connect(db)) as conn:
        tables = [t for (t,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}


def query(db, sql, *args):
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def retail_lines(count):
    with EVENTS.open(encoding="utf-8") as handle:
        return [next(handle).rstrip("\n") for _ in range(count)]


# -- a shop: the example events, ingested once per module and copied per test ----------

@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stored")
    db = folder / "shop.db"
    result = invoke("ingest", "--db", db, "--rules", RETAIL, EVENTS)
    assert result.exit_code == 0, result.output
    bad = write_lines(folder / "late.jsonl", ['{"id": "x1", "customer": "c-0001"'])
    assert invoke("ingest", "--db", db, bad).exit_code == 2
    return db


@pytest.fixture
def shop(stored, tmp_path):
    db = tmp_path / "shop.db"
    for suffix in ("", "-wal"):
        if Path(f"{stored}{suffix}").exists():
            shutil.copyfile(f"{stored}{suffix}", f"{db}{suffix}")
    return db


def a_customer_with(db, rule):
    return query(db, "SELECT customer FROM ledger WHERE rule = ? ORDER BY customer LIMIT 1",
                 rule)[0][0]


# -- 1. an ingest killed with SIGKILL, run again, equals one that was never killed ------

TOTAL = 100_000


def _stream(path):
    """100,000 time-ordered events of 10,000 customers (benchmarks/engine.py)."""
    spec = importlib.util.spec_from_file_location(
        "benchmark_engine", ROOT / "benchmarks" / "engine.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # per_customer 10 gives about 96,000; a little more, cut at exactly 100,000
    events = bench.generate(customers=10_000, per_customer=10.5, seed=20)[:TOTAL]
    assert len(events) == TOTAL
    write_lines(path, (json.dumps(e) for e in events))
    return path


def _ingest_process(db, events):
    return subprocess.Popen(
        [sys.executable, "-m", "retention.cli", "ingest", "--db", str(db),
         "--rules", "examples/rules/retail.yaml", str(events)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed(db):
    """Events a separate reader sees committed (None while there is no table yet)."""
    if not db.exists():
        return None
    try:
        with closing(sqlite3.connect(db, timeout=1)) as conn:
            return conn.execute("SELECT count(*) FROM events").fetchone()[0]
    except sqlite3.OperationalError:
        return None


def _comparable(db):
    with closing(sqlite3.connect(db)) as conn:
        return {
            "events": conn.execute("SELECT * FROM events ORDER BY source, id").fetchall(),
            "customers": conn.execute(
                "SELECT id, opened_at, level, capital, last_ts, next_change_at FROM customers"
                " ORDER BY id").fetchall(),
            "ledger": conn.execute(
                "SELECT customer, ts, at, rule, points, event_id, category, reason FROM ledger"
                " ORDER BY customer, seq").fetchall(),
            "decisions": conn.execute("SELECT * FROM decisions ORDER BY id").fetchall(),
            "dead_letters": conn.execute("SELECT * FROM dead_letters").fetchall(),
            "rules": conn.execute("SELECT hash FROM rule_versions WHERE active = 1").fetchall(),
        }


def test_an_ingest_killed_midway_then_run_again_equals_one_never_killed(tmp_path):
    events = _stream(tmp_path / "stream.jsonl")
    killed_db, whole_db = tmp_path / "A.db", tmp_path / "B.db"
    whole = _ingest_process(whole_db, events)
    killed = _ingest_process(killed_db, events)
    try:
        deadline = time.monotonic() + 120
        while True:
            seen = _committed(killed_db)
            # well inside the run, so customers have history on both sides of the kill
            if seen is not None and TOTAL // 4 <= seen < TOTAL:
                break
            assert killed.poll() is None, f"the ingest ended before the kill: {seen} events"
            assert time.monotonic() < deadline, f"no progress to kill: {seen} events"
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
        killed.communicate()
    finally:
        killed.kill()
    assert killed.returncode == -signal.SIGKILL
    assert 0 < _committed(killed_db) < TOTAL

    again = subprocess.run(
        [sys.executable, "-m", "retention.cli", "ingest", "--db", str(killed_db),
         "--rules", "examples/rules/retail.yaml", str(events)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
    assert again.returncode == 0, again.stderr
    ingested, duplicates, dead, _ = counts(again.stdout)
    assert duplicates > 0 and dead == 0
    assert ingested + duplicates == TOTAL

    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    assert counts(out)[:3] == (TOTAL, 0, 0)

    interrupted, uninterrupted = _comparable(killed_db), _comparable(whole_db)
    assert len(uninterrupted["events"]) == TOTAL
    for table in uninterrupted:
        assert interrupted[table] == uninterrupted[table], table


# -- 2. bad input: one clear line, and nothing stored is damaged ------------------------

def test_a_truncated_last_line_is_dead_lettered_and_the_rest_ingested(tmp_path):
    lines = retail_lines(51)
    events = tmp_path / "cut.jsonl"
    events.write_text("\n".join(lines[:50]) + "\n" + lines[50][:60], encoding="utf-8")
    db = tmp_path / "r.db"
    result = invoke("ingest", "--db", db, "--rules", RETAIL, events)
    failed_cleanly(result, 2)
    assert f"{events}:51: " in result.stderr and "invalid JSON" in result.stderr
    assert counts(result.stdout)[:3] == (50, 0, 1)
    assert query(db, "SELECT count(*) FROM events") == [(50,)]
    letters = json.loads(invoke("dead-letters", "--db", db, "--json").stdout)
    assert [(d["line"], d["raw"]) for d in letters] == [(51, lines[50][:60])]
    assert "invalid JSON" in letters[0]["reason"]


def test_binary_garbage_is_one_line_and_leaves_the_database_as_it_was(tmp_path):
    db = tmp_path / "r.db"
    good = write_lines(tmp_path / "good.jsonl", retail_lines(30))
    assert invoke("ingest", "--db", db, "--rules", RETAIL, good).exit_code == 0
    before = dump(db)
    garbage = tmp_path / "photo.jsonl"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x80\x81" * 50)
    result = invoke("ingest", "--db", db, garbage)
    failed_cleanly(result, 1)
    assert "not UTF-8" in one_line(result.output)
    assert dump(db) == before


def test_a_line_that_is_not_utf8_is_dead_lettered_and_the_rest_ingested(tmp_path):
    lines = retail_lines(300)  # about 50 KB, several reads of the decoder
    head = "".join(line + "\n" for line in lines).encode()
    events = tmp_path / "partly.jsonl"
    events.write_bytes(head + b'{"id": "x\xff"}\n' + lines[0].replace("e-000001", "e-late")
                       .encode() + b"\n")
    db = tmp_path / "r.db"
    result = invoke("ingest", "--db", db, "--rules", RETAIL, events)
    failed_cleanly(result, 2)
    assert f"{events}:301: not UTF-8 text: byte 0xff at column 10" in result.stderr
    assert counts(result.stdout)[:3] == (301, 0, 1)
    assert query(db, "SELECT count(*) FROM events") == [(301,)]
    [letter] = json.loads(invoke("dead-letters", "--db", db, "--json").stdout)
    assert letter["line"] == 301 and "\\xff" in letter["raw"]


@pytest.mark.parametrize("command", [["ingest", "--rules", RETAIL, EVENTS], ["stats"],
                                     ["customer", "c-0001"]])
def test_a_db_that_is_not_sqlite_is_one_line_and_left_alone(tmp_path, command):
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: milk, eggs\n" * 20)
    before = notes.read_bytes()
    result = invoke(command[0], "--db", notes, *command[1:])
    failed_cleanly(result, 1)
    assert "not a SQLite database" in one_line(result.output)
    assert notes.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_db_in_a_read_only_folder_is_one_clear_line(read_only_folder):
    result = invoke("ingest", "--db", read_only_folder / "r.db", "--rules", RETAIL, EVENTS)
    failed_cleanly(result, 1)
    assert "is not writable" in one_line(result.output)


def test_a_db_in_a_read_only_folder_is_one_clear_line_from_the_command(read_only_folder):
    """The same as a process: exit code 1, one line on stderr, nothing left in the folder."""
    result = subprocess.run(
        [sys.executable, "-m", "retention.cli", "ingest", "--db", str(read_only_folder / "r.db"),
         "--rules", str(RETAIL), str(EVENTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "is not writable" in one_line(result.stderr)
    assert list(read_only_folder.iterdir()) == []


def test_a_db_in_a_missing_folder_is_one_clear_line(tmp_path):
    result = invoke("ingest", "--db", tmp_path / "no" / "such" / "r.db", "--rules", RETAIL,
                    EVENTS)
    failed_cleanly(result, 1)
    assert "does not exist" in one_line(result.output)


def test_a_missing_input_file_is_one_clear_line(tmp_path):
    result = invoke("ingest", "--db", tmp_path / "r.db", "--rules", RETAIL,
                    tmp_path / "nowhere.jsonl")
    failed_cleanly(result, 1)
    line = one_line(result.output)
    assert "nowhere.jsonl" in line and "no such file" in line


def test_a_first_ingest_without_rules_says_how_to_give_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("ingest", "--db", "r.db", EVENTS)
    failed_cleanly(result, 1)
    assert "--rules" in one_line(result.output)


def test_a_read_command_on_a_missing_database_does_not_create_one(tmp_path):
    result = invoke("stats", "--db", tmp_path / "typo.db")
    failed_cleanly(result, 1)
    assert "no such database" in one_line(result.output)
    assert not (tmp_path / "typo.db").exists()


# -- 3. CSV, standard input, dead letters ------------------------------------------------

SHOP_CSV = """id,customer,type,at,amount,sku
1,alice,purchase,2025-01-01T10:00:00+00:00,150.5,diapers-x
2,alice,purchase,2025-01-05T10:00:00Z,20,
3,bob,purchase,2025-01-06T10:00:00,10,other
4,bob,purchase
"""


def test_csv_with_a_header_is_ingested_with_amounts_as_numbers(tmp_path):
    events = tmp_path / "orders.csv"
    events.write_text(SHOP_CSV)
    db = tmp_path / "r.db"
    result = invoke("ingest", "--db", db, "--rules", RETAIL, events)
    failed_cleanly(result, 2)
    assert counts(result.stdout)[:3] == (2, 0, 2)
    assert f"{events}:4: " in result.stderr and "time zone" in result.stderr
    assert f"{events}:5: 3 cells for 6 columns" in result.stderr
    exported = json.loads(invoke("export", "--db", db, "alice").stdout)
    amounts = [e["amount"] for e in exported["events"]]
    assert amounts == [150.5, 20]
    assert "sku" not in exported["events"][1]  # an empty cell is absent


def test_csv_identifiers_stay_text(tmp_path):
    # "007" and "7" are two customers, "0001" and "1" two events
    events = tmp_path / "orders.csv"
    events.write_text("id,customer,type,at,amount\n"
                      "0001,007,purchase,2025-01-01T10:00:00Z,10\n"
                      "1,7,purchase,2025-01-02T10:00:00Z,12\n")
    db = tmp_path / "r.db"
    result = invoke("ingest", "--db", db, "--rules", RETAIL, events)
    assert result.exit_code == 0, result.output
    assert counts(result.stdout)[:2] == (2, 0)
    assert sorted(query(db, "SELECT customer, id FROM events")) == [("007", "0001"), ("7", "1")]
    assert invoke("customer", "--db", db, "007").exit_code == 0


def test_standard_input_takes_json_lines_and_csv(tmp_path):
    db = tmp_path / "r.db"
    lines = retail_lines(5)
    result = invoke("ingest", "--db", db, "--rules", RETAIL, "-",
                    input="".join(line + "\n" for line in lines))
    assert result.exit_code == 0, result.output
    assert one_line(result.output) == "ingested 5, duplicates 0, dead-lettered 0, decisions 0"
    result = invoke("ingest", "--db", db, "--format", "csv", "-", input=SHOP_CSV)
    failed_cleanly(result, 2)
    assert counts(result.stdout)[:3] == (2, 0, 2)
    assert "stdin:4: " in result.stderr
    origins = {d["origin"] for d in json.loads(invoke("dead-letters", "--db", db,
                                                      "--json").stdout)}
    assert origins == {"stdin"}


def test_a_run_with_every_line_used_exits_0_and_again_counts_duplicates(tmp_path):
    db = tmp_path / "r.db"
    events = write_lines(tmp_path / "e.jsonl", retail_lines(200))
    first = invoke("ingest", "--db", db, "--rules", RETAIL, events)
    assert first.exit_code == 0, first.output
    assert counts(first.stdout)[:3] == (200, 0, 0)
    second = invoke("ingest", "--db", db, events)
    assert second.exit_code == 0, second.output
    assert counts(second.stdout) == (0, 200, 0, 0)


def _with_dead_letters(tmp_path):
    db = tmp_path / "r.db"
    events = write_lines(tmp_path / "e.jsonl", [
        *retail_lines(3),
        "not json, at all",
        '{"id": "n1", "customer": "dora", "type": "purchase", "at": "2025-02-01T10:00:00"}',
    ])
    result = invoke("ingest", "--db", db, "--rules", RETAIL, events)
    failed_cleanly(result, 2)
    assert counts(result.stdout)[:3] == (3, 0, 2)
    return db, events


def test_dead_letters_are_listed_with_their_reason_in_every_format(tmp_path):
    db, events = _with_dead_letters(tmp_path)
    table = invoke("dead-letters", "--db", db)
    assert table.exit_code == 0
    assert "invalid JSON" in table.stdout and "no time zone" in table.stdout
    as_json = json.loads(invoke("dead-letters", "--db", db, "--json").stdout)
    assert [(d["origin"], d["line"]) for d in as_json] == [(str(events), 4), (str(events), 5)]
    assert "invalid JSON" in as_json[0]["reason"]
    assert as_json[0]["raw"] == "not json, at all"
    as_nl = [json.loads(line) for line in
             invoke("dead-letters", "--db", db, "--nl").stdout.splitlines()]
    assert as_nl == as_json
    as_csv = list(csv.DictReader(io.StringIO(invoke("dead-letters", "--db", db,
                                                    "--csv").stdout)))
    assert [(r["line"], r["reason"], r["raw"]) for r in as_csv] == [
        (str(d["line"]), d["reason"], d["raw"]) for d in as_json]


def test_retrying_dead_letters_keeps_what_is_still_unusable(tmp_path):
    db, _ = _with_dead_letters(tmp_path)
    result = invoke("dead-letters", "--db", db, "--retry")
    failed_cleanly(result, 2)
    assert one_line(result.output) == ("ingested 0, duplicates 0, still dead-lettered 2, "
                                       "decisions 0")
    reasons = [d["reason"] for d in json.loads(invoke("dead-letters", "--db", db,
                                                      "--json").stdout)]
    assert "invalid JSON" in reasons[0] and "no time zone" in reasons[1]


def test_a_dead_letter_fixed_in_place_goes_in_on_retry(tmp_path):
    db, _ = _with_dead_letters(tmp_path)
    with closing(sqlite3.connect(db)) as conn, conn:  # the user mends the stored line
        conn.execute("UPDATE dead_letters SET raw = replace(raw, '10:00:00\"', "
                     "'10:00:00Z\"') WHERE raw LIKE '%dora%'")
    result = invoke("dead-letters", "--db", db, "--retry")
    failed_cleanly(result, 2)
    assert one_line(result.output).startswith("ingested 1, duplicates 0, still dead-lettered 1")
    assert query(db, "SELECT id FROM events WHERE customer = 'dora'") == [("n1",)]
    left = json.loads(invoke("dead-letters", "--db", db, "--json").stdout)
    assert [d["raw"] for d in left] == ["not json, at all"]


def test_retrying_a_csv_dead_letter_keeps_its_real_reason(tmp_path):
    # a usable CSV row is kept as the JSON object it made, a broken one as it was
    events = tmp_path / "orders.csv"
    events.write_text(SHOP_CSV)
    db = tmp_path / "r.db"
    invoke("ingest", "--db", db, "--rules", RETAIL, events)
    retried = invoke("dead-letters", "--db", db, "--retry")
    failed_cleanly(retried, 2)
    assert retried.stdout.startswith("ingested 0, duplicates 0, still dead-lettered 2")
    letters = json.loads(invoke("dead-letters", "--db", db, "--json").stdout)
    reasons = sorted(d["reason"] for d in letters)
    assert reasons == ["3 cells for 6 columns",
                       "event 3: field 'at': 2025-01-06T10:00:00 has no time zone "
                       "(add Z or an offset like +00:00)"], reasons
    assert sorted(d["retriable"] for d in letters) == [0, 1]


# -- 4. init ------------------------------------------------------------------------------

def test_init_makes_a_project_whose_rules_check_and_ingest(tmp_path, monkeypatch):
    project = tmp_path / "shop"
    result = invoke("init", project)
    assert result.exit_code == 0, result.output
    assert (project / "rules" / "retail.yaml").is_file()
    assert (project / "retention.db").is_file()
    checked = invoke("check", project / "rules")
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.startswith("ok: 1 file: 13 rules")
    again = invoke("init", project)
    assert again.exit_code == 0 and "kept" in again.stdout
    monkeypatch.chdir(tmp_path)  # no rules folder here: the database's rules are used
    events = write_lines(tmp_path / "e.jsonl", retail_lines(20))
    ingested = invoke("ingest", "--db", project / "retention.db", events)
    assert ingested.exit_code == 0, ingested.output
    assert counts(ingested.stdout)[:3] == (20, 0, 0)


def test_init_points_editors_at_the_json_schema_it_writes(tmp_path):
    from retention.rules.loader import load_rules

    project = tmp_path / "shop"
    assert invoke("init", project).exit_code == 0
    rules = project / "rules" / "retail.yaml"
    first = rules.read_text().splitlines()[0]
    hint = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert hint, first
    schema = (rules.parent / hint.group(1)).resolve()  # relative to the rule file
    packaged = Path(__file__).resolve().parent.parent / "retention" / "rules" / "schema.json"
    assert schema.read_text() == packaged.read_text()
    assert json.loads(schema.read_text())["title"] == "retention-engine rule file"
    assert len(load_rules(project / "rules").sources) == 1  # the schema is not a rule file


# -- 5. reading and acting on a shop -------------------------------------------------------

def test_tick_prints_the_decisions_time_made_once(shop):
    first = invoke("tick", "--db", shop, "--now", END)
    assert first.exit_code == 0, first.output
    header, rule, *rows = first.stdout.splitlines()
    assert header.split() == ["id", "at", "customer", "rule", "action", "status", "reason",
                              "params"]
    assert set(rule) <= {"-", " "}
    assert rows
    second = invoke("tick", "--db", shop, "--now", END)
    assert second.stdout == "no decision up to 2026-07-01T00:00:00+00:00\n"


def test_pending_decisions_as_json(shop):
    result = invoke("decisions", "--db", shop, "--status", "pending", "--json")
    assert result.exit_code == 0, result.output
    decisions = json.loads(result.stdout)
    assert decisions
    assert {d["status"] for d in decisions} == {"pending"}
    assert {"id", "customer", "rule", "action", "kind", "params", "at"} <= set(decisions[0])
    times = [d["at"] for d in decisions]
    assert times == sorted(times, key=lambda t: t.replace("Z", "+00:00"))


def test_customer_shows_capital_level_and_the_explained_ledger(shop):
    cid = a_customer_with(shop, "complaint")
    table = invoke("customer", "--db", shop, cid, "--at", END)
    assert table.exit_code == 0, table.output
    text = table.stdout
    assert text.startswith(f"customer  {cid}\ncapital   ")
    assert "level" in text and "complaint: -12 points" in text
    now = json.loads(invoke("customer", "--db", shop, cid, "--at", END, "--json").stdout)
    assert f"capital   {now['capital']:.2f} at 2026-07-01T00:00:00+00:00" in text
    opened = now["ledger"][0]
    assert opened["rule"] == "opening"
    early = json.loads(invoke("customer", "--db", shop, cid, "--at", opened["at"],
                              "--json").stdout)
    assert len(early["ledger"]) < len(now["ledger"])
    before = invoke("customer", "--db", shop, cid, "--at", "2024-01-01T00:00:00Z")
    assert "not open (a prospect)" in before.stdout


def test_at_risk_lists_the_lowest_capital_first(shop):
    watch = json.loads(invoke("at-risk", "--db", shop, "--level", "watch", "--json").stdout)
    assert {r["level"] for r in watch} == {"watch", "rupture"}
    capitals = [r["capital"] for r in watch]
    assert capitals == sorted(capitals)
    rupture = json.loads(invoke("at-risk", "--db", shop, "--level", "rupture",
                                "--json").stdout)
    assert {r["level"] for r in rupture} == {"rupture"}
    assert {r["customer"] for r in rupture} < {r["customer"] for r in watch}
    top = json.loads(invoke("at-risk", "--db", shop, "--limit", "3", "--json").stdout)
    assert top == watch[:3]
    wrong = invoke("at-risk", "--db", shop, "--level", "wach")
    failed_cleanly(wrong, 1)
    assert "watch" in one_line(wrong.output)


@pytest.mark.parametrize("at", [END, "2026-03-15T12:00:00+00:00", "2027-01-01T00:00:00Z"])
def test_every_at_risk_row_agrees_with_the_customer_at_that_moment(shop, at):
    """The capital and level at-risk shows are those of `customer ID --at T`, and the
    capital is below the threshold asked for; nobody below it is left out."""
    from retention import Engine

    rows = json.loads(invoke("at-risk", "--db", shop, "--at", at, "--json").stdout)
    rupture = json.loads(invoke("at-risk", "--db", shop, "--level", "rupture", "--at", at,
                                "--json").stdout)
    assert rows and rupture
    assert all(r["capital"] < 55 for r in rows)
    assert all(r["capital"] < 35 for r in rupture)
    with Engine.open(shop) as store:
        for row in rows:
            shown = store.profile(row["customer"], at)
            assert (row["capital"], row["level"]) == (
                pytest.approx(shown["capital"], abs=1e-9), shown["level"]), row
        capitals = {cid: store.capital(cid, at) for cid in store.customers()}
    below = sorted(cid for cid, capital in capitals.items()
                   if capital is not None and capital < 55)
    assert sorted(r["customer"] for r in rows) == below


def test_the_customer_ledger_adds_up_to_the_capital_it_shows(shop):
    at = "2026-03-15T12:00:00+00:00"
    for cid in ("c-0830", "c-0243", a_customer_with(shop, "licence")):
        shown = json.loads(invoke("customer", "--db", shop, cid, "--at", at, "--json").stdout)
        total = sum(e["points"] for e in shown["ledger"])
        assert total == pytest.approx(shown["capital"], abs=1e-6), cid
        pending = [e for e in shown["ledger"] if not e["settled"]]
        assert all(e["at"] == shown["at"] for e in pending)
        if cid == "c-0830":  # silent since January, its traces faded meanwhile
            assert {e["category"] for e in pending} == {"silence", "fading"}
        table = invoke("customer", "--db", shop, cid, "--at", at).stdout
        assert f"in all    {shown['capital']:.2f}" in table


def test_the_level_shown_at_a_moment_is_the_level_then(shop):
    """Before a level fired, the customer is not in it yet."""
    from retention import Engine

    with Engine.open(shop) as store:
        fired = next(d for d in store.decisions() if d.rule == "rupture")
    just_before = (fired.at - timedelta(seconds=1)).isoformat()
    before = json.loads(invoke("customer", "--db", shop, fired.customer, "--at", just_before,
                               "--json").stdout)
    after = json.loads(invoke("customer", "--db", shop, fired.customer, "--at",
                              fired.at.isoformat(), "--json").stdout)
    assert before["level"] != "rupture" and after["level"] == "rupture"


def test_stats_as_json(shop):
    report = json.loads(invoke("stats", "--db", shop, "--json").stdout)
    assert set(report) == {"customers_by_level", "capital", "decisions", "forces", "events",
                           "dead_letters", "forgotten_customers"}
    assert report["events"] == 27390
    assert report["dead_letters"] == 1
    assert sum(report["customers_by_level"].values()) == 2000
    assert {"min", "median", "max", "mean"} <= set(report["capital"])


def test_export_is_everything_about_one_customer_as_json(shop):
    cid = a_customer_with(shop, "complaint")
    result = invoke("export", "--db", shop, cid)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["customer"] == cid
    assert data["events"] and all(e["at"] for e in data["events"])
    assert any(e["rule"] == "complaint" for e in data["ledger"])
    assert data["state"]["opened_at"]
    unknown = invoke("export", "--db", shop, "nobody")
    failed_cleanly(unknown, 1)
    assert one_line(unknown.output) == "error: unknown customer 'nobody'"


def test_forget_erases_a_customer_for_good(shop):
    cid = a_customer_with(shop, "complaint")
    result = invoke("forget", "--db", shop, cid, "--yes")
    assert result.exit_code == 0, result.output
    assert re.match(rf"^erased \d+ events, .* of {cid}; database vacuumed$",
                    one_line(result.stdout)), result.stdout
    gone = invoke("customer", "--db", shop, cid)
    failed_cleanly(gone, 1)
    assert one_line(gone.output) == f"error: unknown customer {cid!r}"
    for path in shop.parent.iterdir():
        if path.name.startswith(shop.name):
            assert cid.encode() not in path.read_bytes(), path
    stats = json.loads(invoke("stats", "--db", shop, "--json").stdout)
    assert stats["forgotten_customers"] == 1


# -- 6. rule-file versions ----------------------------------------------------------------

def _versions(db):
    return json.loads(invoke("rules", "list", "--db", db, "--json").stdout)


def test_a_broken_rule_file_changes_nothing(shop, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  late: {when: event.type == \"x\", pionts: -3}\n"
                   "levels:\n  - {name: w, below: 50, then: [nope]}\n")
    before = dump(shop)
    result = invoke("rules", "use", "--db", shop, bad)
    failed_cleanly(result, 1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert all(re.match(rf"^{re.escape(str(bad))}:\d+:\d+: ", line) for line in lines), lines
    versions = _versions(shop)
    assert [v["active"] for v in versions] == [True]
    assert dump(shop) == before


def test_a_changed_rule_file_becomes_the_active_version(shop, tmp_path):
    cid = a_customer_with(shop, "complaint")
    changed = tmp_path / "harsher.yaml"
    changed.write_text(RETAIL.read_text().replace("points: -12", "points: -14"))
    result = invoke("rules", "use", "--db", shop, changed)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"now using {changed}: 1 file: 13 rules")
    versions = _versions(shop)
    assert [v["active"] for v in versions] == [False, True]
    assert versions[1]["files"].endswith("harsher.yaml")
    ledger = json.loads(invoke("customer", "--db", shop, cid, "--json").stdout)["ledger"]
    assert {e["points"] for e in ledger if e["rule"] == "complaint"} == {-14}
    again = invoke("rules", "use", "--db", shop, changed)
    assert again.stdout.startswith("already using")
    assert len(_versions(shop)) == 2


def test_rules_use_does_not_tell_the_user_to_run_rules_use(shop, tmp_path):
    changed = tmp_path / "harsher.yaml"
    changed.write_text(RETAIL.read_text().replace("points: -12", "points: -14"))
    result = invoke("rules", "use", "--db", shop, changed)
    assert result.exit_code == 0, result.output
    assert "note:" not in result.stderr, result.stderr


# -- 7. the demo -----------------------------------------------------------------------------

def test_the_demo_tells_the_story_and_runs_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outputs = []
    for _ in range(2):
        result = invoke("demo")
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout)
    assert (tmp_path / "retention-demo.db").is_file()
    story = outputs[0]
    for part in ("most at risk", "recognition rewards granted", "suppressed"):
        assert part in story
    assert story.startswith("27390 events of 2000 customers ingested into retention-demo.db")
    assert outputs[0] == outputs[1]


READS = [["stats"], ["customer", "c1"], ["at-risk"], ["decisions"], ["export", "c1"],
         ["dead-letters"], ["rules", "list"], ["tick"], ["forget", "c1"], ["deliver"]]


def test_help_conventions_of_every_command():
    """-h is --help everywhere; options read from the environment say so; the
    listings take --limit."""
    names = [[name] for name in cli.commands if name != "rules"] + [["rules", "use"],
                                                                     ["rules", "list"]]
    for command in names:
        short, long = invoke(*command, "-h"), invoke(*command, "--help")
        assert short.exit_code == 0 and short.stdout == long.stdout, command
        if "The SQLite database." in short.stdout:  # (the demo has its own)
            assert "env var: RETENTION_DB" in short.stdout, command
    assert "RETENTION_<SINK>_<KEY>" in invoke("-h").stdout
    for listing in (["at-risk"], ["decisions"], ["dead-letters"]):
        assert "--limit" in invoke(*listing, "-h").stdout


def test_limit_bounds_every_listing(shop):
    for command in (["at-risk"], ["decisions"], ["dead-letters"]):
        got = json.loads(invoke(*command, "--db", shop, "--limit", "1", "--json").stdout)
        assert len(got) == 1, command


@pytest.mark.parametrize("command", READS, ids=" ".join)
def test_a_command_on_a_missing_database_says_so_and_creates_nothing(tmp_path, command):
    missing = tmp_path / "nope.db"
    split = 2 if command[0] == "rules" else 1
    result = invoke(*command[:split], "--db", missing, *command[split:])
    failed_cleanly(result, 1)
    assert "nope.db: no such database" in one_line(result.output)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_first_open_leaves_no_database_behind(tmp_path, monkeypatch):
    from retention import Engine
    from retention.errors import RetentionError

    monkeypatch.chdir(tmp_path)
    events = tmp_path / "e.jsonl"
    events.write_text(json.dumps({"id": "1", "customer": "a", "type": "purchase",
                                  "at": "2026-01-01T00:00:00Z"}) + "\n")
    failed_cleanly(invoke("ingest", "--db", "new.db", events), 1)  # no ./rules
    broken = tmp_path / "broken.yaml"
    broken.write_text('rules:\n  x: {when: event.type == "a", pionts: 3}\n')
    failed_cleanly(invoke("ingest", "--db", "new.db", "--rules", broken, events), 1)
    for rules in (None, broken):
        with pytest.raises(RetentionError):
            Engine.open(tmp_path / "new.db", rules=rules)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "e.jsonl"]


# -- 8. every listing parses in every machine format ------------------------------------------

LISTINGS = {
    "tick": ["tick", "--now", END],
    "customer": ["customer", "c-0420", "--at", END],
    "at-risk": ["at-risk"],
    "decisions": ["decisions"],
    "stats": ["stats"],
    "dead-letters": ["dead-letters"],
    "plugins": ["plugins"],
    "rules list": ["rules", "list"],
}


@pytest.mark.parametrize("fmt", ["--json", "--nl", "--csv"])
@pytest.mark.parametrize("name", list(LISTINGS))
def test_every_listing_parses(shop, name, fmt):
    command = LISTINGS[name]
    split = 2 if command[0] == "rules" else 1
    db = () if name == "plugins" else ("--db", shop)
    result = invoke(*command[:split], *db, *command[split:], fmt)
    assert result.exit_code == 0, result.output
    text = result.stdout
    if fmt == "--json":
        parsed = json.loads(text)
        assert parsed
        helped = invoke(*command[:split], "-h").stdout
        said = re.search(r"--json\s+(.*?)\n\s+--nl", helped, flags=re.S).group(1)
        assert ("JSON array" in said) is isinstance(parsed, list), said
        assert ("JSON object" in said) is isinstance(parsed, dict), said
    elif fmt == "--nl":
        parsed = [json.loads(line) for line in text.splitlines()]
        assert parsed and all(isinstance(p, dict) for p in parsed)
    else:
        header, *rows = list(csv.reader(io.StringIO(text)))
        assert header and rows
        assert all(len(row) == len(header) for row in rows)


# -- 9. the environment ---------------------------------------------------------------------

def test_retention_db_and_retention_rules_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "from-env.db"
    env = {"RETENTION_DB": str(db), "RETENTION_RULES": str(RETAIL)}
    events = write_lines(tmp_path / "e.jsonl", retail_lines(40))
    result = invoke("ingest", events, env=env)
    assert result.exit_code == 0, result.output
    assert counts(result.stdout)[:3] == (40, 0, 0)
    assert db.is_file() and not (tmp_path / "retention.db").exists()
    stats = json.loads(invoke("stats", "--json", env={"RETENTION_DB": str(db)}).stdout)
    assert stats["events"] == 40
    versions = json.loads(invoke("rules", "list", "--json", env=env).stdout)
    assert versions[0]["files"].endswith("retail.yaml")


# -- dead letters across runs ---------------------------------------------------------------

NO_ZONE = '{"id": "i1", "customer": "c1", "type": "complaint", "at": "2025-01-02T00:00:00"}'
OPENING = '{"id": "p1", "customer": "c1", "type": "purchase", "at": "2025-01-01T00:00:00Z"}'


def test_running_an_ingest_again_keeps_each_dead_letter_once(tmp_path):
    events = write_lines(tmp_path / "e.jsonl", [OPENING, NO_ZONE, "not json"])
    db = tmp_path / "r.db"
    for _ in range(2):
        result = invoke("ingest", "--db", db, "--rules", RETAIL, events)
        failed_cleanly(result, 2)
    assert query(db, "SELECT line, reason FROM dead_letters ORDER BY line") == [
        (2, "event i1: field 'at': 2025-01-02T00:00:00 has no time zone "
            "(add Z or an offset like +00:00)"),
        (3, "invalid JSON: Expecting value (column 1)")]


def test_a_dead_letter_keeps_its_source_and_goes_when_the_fixed_event_lands(tmp_path):
    events = write_lines(tmp_path / "e.jsonl", [OPENING, NO_ZONE])
    db = tmp_path / "r.db"
    failed_cleanly(invoke("ingest", "--db", db, "--rules", RETAIL, "--source", "shop", events),
                   2)
    [letter] = json.loads(invoke("dead-letters", "--db", db, "--json").stdout)
    assert json.loads(letter["raw"])["source"] == "shop"
    write_lines(events, [OPENING, NO_ZONE.replace(':00:00"', ':00:00Z"')])  # the fix
    result = invoke("ingest", "--db", db, "--source", "shop", events)
    assert result.exit_code == 0, result.output
    assert counts(result.stdout)[:3] == (1, 1, 0)
    assert query(db, "SELECT source, id FROM events ORDER BY id") == [
        ("shop", "i1"), ("shop", "p1")]
    assert query(db, "SELECT count(*) FROM dead_letters") == [(0,)]


def test_at_risk_at_an_earlier_time_replays_each_customer(shop):
    at = "2025-09-01T00:00:00+00:00"
    rows = json.loads(invoke("at-risk", "--db", shop, "--at", at, "--json").stdout)
    assert rows
    for row in rows[:5]:
        shown = json.loads(invoke("customer", "--db", shop, row["customer"], "--at", at,
                                  "--json").stdout)
        assert row["capital"] == pytest.approx(shown["capital"])
    assert all(r["capital"] is not None for r in rows)


def test_init_in_an_existing_project_keeps_its_rules_version(tmp_path):
    project = tmp_path / "shop"
    assert invoke("init", project).exit_code == 0
    rules = project / "rules" / "retail.yaml"
    rules.write_text(rules.read_text().replace("points: -12", "points: -14"))
    again = invoke("init", project)
    assert again.exit_code == 0
    assert "kept" in again.stdout and "note:" in again.stderr
    versions = json.loads(invoke("rules", "list", "--db", project / "retention.db",
                                 "--json").stdout)
    assert len(versions) == 1


def test_the_demo_does_not_overwrite_another_database(shop):
    before = dump(shop)
    result = invoke("demo", "--db", shop)
    failed_cleanly(result, 1)
    assert "is not a demo database" in one_line(result.output)
    assert dump(shop) == before


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    events = tmp_path / "excel.csv"
    events.write_bytes("\ufeffid,customer,type,at,amount\n1,ann,purchase,2025-01-01T10:00:00Z,10\n"
                       .encode())
    result = invoke("ingest", "--db", tmp_path / "r.db", "--rules", RETAIL, events)
    assert result.exit_code == 0, result.output
    assert counts(result.stdout)[:3] == (1, 0, 0)


def test_a_named_pipe_is_read_once_and_whole(tmp_path):
    fifo = tmp_path / "events.pipe"
    os.mkfifo(fifo)
    lines = retail_lines(200)
    writer = subprocess.Popen(["sh", "-c", f'cat > "{fifo}"'], stdin=subprocess.PIPE)
    writer.stdin.write("".join(line + "\n" for line in lines).encode())
    writer.stdin.close()
    result = invoke("ingest", "--db", tmp_path / "r.db", "--rules", RETAIL, fifo)
    writer.wait(timeout=30)
    assert result.exit_code == 0, result.output
    assert counts(result.stdout)[:3] == (200, 0, 0)


def test_a_damaged_customer_state_is_one_line(shop):
    with closing(sqlite3.connect(shop)) as conn:
        conn.execute("UPDATE customers SET state = x'4d0102' WHERE id = 'c-0005'")
        conn.commit()
    result = invoke("customer", "--db", shop, "c-0005")
    failed_cleanly(result, 1)
    assert "stored state of customer c-0005 is damaged" in one_line(result.output)


def test_a_folder_given_as_input_is_refused_before_anything_is_made(tmp_path):
    folder = tmp_path / "events"
    folder.mkdir()
    result = invoke("ingest", "--db", tmp_path / "r.db", "--rules", RETAIL, folder)
    failed_cleanly(result, 1)
    assert "a folder, not a file of events" in one_line(result.output)
    assert not (tmp_path / "r.db").exists()


def test_ingest_batch_default_is_the_store_default():
    from retention.cli import ingest
    from retention.store import BATCH

    (option,) = [p for p in ingest.params if p.name == "batch_size"]
    assert option.default == BATCH
