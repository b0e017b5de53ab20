"""The attack list: each hostile input found against the engine, store, server,
sinks and rule files, refused or bounded. Read this module to see what the
project defends against; each section is one finding, numbered as in the issue
that listed them, and each test failed on the code before its fix.
"""

import json
import re
import sqlite3
from pathlib import Path

import pytest

# 1. Replay race: one signed event sent on many connections at once is stored once.



# 2. Email header injection through encoded words.



# 3. Times at the edge of the calendar.

_ROOT = Path(__file__).resolve().parent.parent
_RETAIL = _ROOT / "examples" / "rules" / "retail.yaml"
_EDGES = ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00", "2200-01-01T00:00:00Z",
          "1899-12-31T23:59:59.999999Z"]


def _cli(*args, input=None):
    from click.testing import CliRunner

    from retention.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def _strict_json(text):
    """JSON as the standard reads it: NaN and Infinity are no JSON."""
    def refuse(word):
        raise ValueError(f"{word} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _purchase(event_id, customer, at, **props):
    return {"id": event_id, "customer": customer, "type": "purchase", "at": at, **props}


@pytest.mark.parametrize("edge", _EDGES)
def test_a_time_outside_the_supported_range_is_a_dead_letter_and_the_customer_works(
        tmp_path, edge):
    from retention import Engine

    other = tmp_path / "other.yaml"
    other.write_text(_RETAIL.read_text().replace("initial: 70", "initial: 80"))
    with Engine.open(tmp_path / "r.db", rules=_RETAIL) as store:
        report = store.ingest([
            _purchase("p1", "c1", "2026-01-01T10:00:00Z", amount=20),
            _purchase("edge", "c1", edge, amount=20),
            # earlier than the edge event: it would replay the customer with it
            {"id": "d1", "customer": "c1", "type": "delivery", "at": "2026-01-03T10:00:00Z",
             "delay_days": 4}])
        assert (report.ingested, report.dead_lettered) == (2, 1)
        [letter] = store.dead_letters()
        assert "outside the supported time range (1900-01-01 to 2199-12-31 UTC)" in \
            letter["reason"], letter["reason"]
        assert letter["reason"].startswith("event edge: field 'at': ")
        # the customer keeps working: more events, reading, exporting, new rules
        more = store.ingest([_purchase("p2", "c1", "2026-01-02T10:00:00Z", amount=5)])
        assert (more.ingested, more.dead_lettered) == (1, 0)
        profile = store.profile("c1", "2026-02-01T00:00:00Z")
        assert profile["capital"] is not None
        exported = store.export("c1")
        assert _strict_json(json.dumps(exported)) == exported
        assert [e["id"] for e in exported["events"]] == ["p1", "p2", "d1"]
        assert store.use_rules(other) is True
        assert store.forget("c1")["events"] == 3
        assert store.dead_letters() == []  # the letter named them: erased with them


@pytest.mark.parametrize("edge", _EDGES[:2])
def test_a_time_outside_the_range_is_refused_by_the_library(edge):
    from datetime import datetime

    from retention import Engine, EventError
    from retention.models import Event

    engine = Engine.from_path(_RETAIL)
    engine.process(_purchase("p1", "c1", "2026-01-01T10:00:00Z", amount=20))
    with pytest.raises(EventError, match=r"field 'at': .* outside the supported time range"):
        engine.process(_purchase("edge", "c1", edge))
    as_event = Event(id="edge", customer="c1", type="purchase",
                     at=datetime.fromisoformat(edge))
    with pytest.raises(EventError, match="outside the supported time range"):
        engine.process(as_event)
    with pytest.raises(EventError, match="outside the supported time range"):
        engine.tick(edge)
    # the customer is as before, and goes on
    engine.process(_purchase("p2", "c1", "2026-01-02T10:00:00Z"))
    assert [e.event_id for e in engine.explain("c1") if e.rule == "satisfied_purchase"] == \
        ["p1", "p2"]
    assert engine.capital("c1", at="2199-12-31T23:59:59Z") is not None


def test_edge_times_through_the_cli_leave_every_command_working(tmp_path):
    db = tmp_path / "r.db"
    events = _lines(tmp_path / "edge.jsonl",
                    json.dumps(_purchase("p1", "c1", "2026-01-01T10:00:00Z", amount=20)),
                    json.dumps(_purchase("e1", "c1", _EDGES[0])),
                    json.dumps(_purchase("e2", "c1", _EDGES[1])),
                    json.dumps(_purchase("p2", "c1", "2025-12-20T10:00:00Z")))
    result = _cli("ingest", "--db", db, "--rules", _RETAIL, events)
    assert result.exit_code == 2, result.output
    assert "edge.jsonl:2: event e1: field 'at': 9999-12-31T23:59:59-05:00 is outside the " \
           "supported time range (1900-01-01 to 2199-12-31 UTC)" in result.output
    assert "edge.jsonl:3: event e2: field 'at': 0001-01-01T00:00:00+05:00 is outside" \
        in result.output
    assert result.output.strip().splitlines()[-1].startswith("ingested 2, duplicates 0, "
                                                              "dead-lettered 2")
    for args in (["customer", "--db", db, "c1", "--at", "2026-02-01T00:00:00Z"],
                 ["customer", "--db", db, "c1", "--json"],
                 ["export", "--db", db, "c1"],
                 ["stats", "--db", db, "--json"],
                 ["tick", "--db", db, "--now", "2199-12-31T23:59:59Z"],
                 ["rules", "use", "--db", db, _ROOT / "examples" / "rules" / "kaufman.yaml"]):
        done = _cli(*args)
        assert done.exit_code == 0, (args, done.output, done.exception)
    assert _strict_json(_cli("export", "--db", db, "c1").stdout)["customer"] == "c1"
    late = _cli("tick", "--db", db, "--now", _EDGES[0])
    assert late.exit_code == 2 and "outside the supported time range" in late.output
    assert "Traceback" not in late.output
    forgot = _cli("forget", "--db", db, "c1", "--yes")
    assert forgot.exit_code == 0, forgot.output
    assert re.match(r"^erased 2 events, 1 snapshot, \d+ ledger entr(y|ies), 0 aliases, "
                     r"\d+ decisions?, 2 dead letters of c1; database vacuumed$",
                     forgot.output.strip()), forgot.output


def test_the_server_answers_edge_times_with_their_reason(tmp_path):
    from retention.store import StoredEngine
    from tests.test_server import config_of, create_app, serving

    db = tmp_path / "shop.db"
    StoredEngine(db, _RETAIL).close()
    with serving(create_app(config_of(db))) as server:
        reply = server.post("/events", [_purchase("p1", "c1", "2026-01-01T10:00:00Z"),
                                        _purchase("e1", "c1", _EDGES[0]),
                                        _purchase("p2", "c1", "2025-12-01T10:00:00Z")])
        assert reply.status == 422, reply
        assert (reply.body["new"], reply.body["dead_lettered"]) == (2, 1)
        assert "outside the supported time range" in reply.body["errors"][0]
        shown = server.get("/customers/c1")
        assert shown.status == 200, shown
        assert [e["event_id"] for e in shown.body["ledger"] if e["rule"] == "opening"] == \
            ["p2"]
        late = server.get(f"/customers/c1?at={_EDGES[0].replace('+', '%2B')}")
        assert late.status == 400 and "outside the supported time range" in \
            late.body["error"], late


def test_the_longest_durations_at_the_end_of_the_range_never_overflow(tmp_path):
    """Every duration at its cap (100 years), an event in the range's last
    microsecond, a drain so slow its level is crossed past the year 9999: processing,
    ticks, the ledger, an export and a rules switch all work."""
    from retention import Engine

    longest = """
capital: {initial: 70, min: 0, max: 100}
rules:
  bought: {when: event.type == "purchase", points: 1}
  late: {when: event.type == "late", points: -20, fades_over: 36500d,
         repeat: {within: 36500d, factor: 2}}
  halving: {when: event.type == "late", points: -5, half_life: 36500d, keep: 0.5}
  rate: {when: event.type == "late", points: -5, fades: {rate: 1%, per: 36500d}}
  complaint: {when: event.type == "complaint", points: -5}
  answered: {when: event.type == "answered", recovers: complaint, match: ticket,
             within: 36500d}
silence: {after: 36500d, rate_per_day: 0.000001}
licence: {clean_for: 36500d, points: 1}
levels:
  - {name: watch, below: 60, rearm: 5, then: [flag]}
recognition:
  loyal: {after: {purchases: 2, within: 36500d}, then: [flag]}
pressure: {max: 1, per: 36500d}
actions:
  flag: {kind: service, via: crm_tag}
"""
    rules = tmp_path / "longest.yaml"
    rules.write_text(longest)
    last = "2199-12-31T23:59:59.999999Z"
    events = [_purchase("p0", "c1", "1900-01-01T00:00:00Z"),
              {"id": "l1", "customer": "c1", "type": "late", "at": "1900-01-02T00:00:00Z"},
              {"id": "k1", "customer": "c1", "type": "complaint", "at": "2199-12-30T00:00:00Z",
               "ticket": "t"},
              _purchase("p1", "c1", last),
              {"id": "l2", "customer": "c1", "type": "late", "at": last},
              {"id": "a1", "customer": "c1", "type": "answered", "at": last, "ticket": "t"},
              _purchase("p2", "c2", "2199-12-31T00:00:00Z")]
    with Engine.open(tmp_path / "r.db", rules=rules) as store:
        report = store.ingest(events)
        assert (report.ingested, report.dead_lettered) == (7, 0), report.problems
        store.tick(last)
        exported = store.export("c1")
        assert _strict_json(json.dumps(exported)) == exported
        assert exported["ledger"]
        # the slow drain crosses the level far past the years a datetime holds
        assert store.export("c2")["state"]["next_change_at"] is None
        assert store.next_change("c2") > 253402300800  # (after 9999-12-31)
        store.profile("c1", last)
        assert store.use_rules(_RETAIL)
        assert store.use_rules(rules)
        assert store.forget("c2")["events"] == 1



# 4. A condition cannot hang the engine.



# 5. Rule files are bounded.



# 6. A lone surrogate in an event is a dead letter, not a lost batch.

#: a lone surrogate in every place an event can hold a string, as JSON spells it
_SURROGATES = {
    "id": r'{"id": "\ud800", "customer": "c1", "type": "purchase", "at": "2026-01-02T00:00:00Z"}',
    "customer": r'{"id": "s2", "customer": "c\udfff", "type": "purchase", '
                r'"at": "2026-01-02T00:00:00Z"}',
    "type": r'{"id": "s3", "customer": "c1", "type": "\udc00", "at": "2026-01-02T00:00:00Z"}',
    "source": r'{"id": "s4", "customer": "c1", "type": "purchase", "source": "\ud801",'
              r' "at": "2026-01-02T00:00:00Z"}',
    "property": r'{"id": "s5", "customer": "c1", "type": "purchase", "sku": "a\ud800b",'
                r' "at": "2026-01-02T00:00:00Z"}',
    "nested": r'{"id": "s6", "customer": "c1", "type": "purchase", '
              r'"items": [{"sku": ["\udbff"]}], "at": "2026-01-02T00:00:00Z"}',
    "key": r'{"id": "s7", "customer": "c1", "type": "purchase", "\ud800": 1,'
           r' "at": "2026-01-02T00:00:00Z"}',
    "nested key": r'{"id": "s8", "customer": "c1", "type": "purchase", '
                  r'"x": {"k\ud800": 1}, "at": "2026-01-02T00:00:00Z"}',
    "alias": r'{"type": "identify", "customer": "c1", "aliases": ["\udc01"]}',
}


def test_lone_surrogates_are_dead_letters_and_the_good_lines_land(tmp_path):
    db = tmp_path / "r.db"
    good = [json.dumps(_purchase("g1", "c1", "2026-01-01T10:00:00Z", amount=10)),
            json.dumps(_purchase("g2", "c2", "2026-01-01T11:00:00Z", note="café ☕"))]
    events = _lines(tmp_path / "s.jsonl", good[0], *_SURROGATES.values(), good[1])
    result = _cli("ingest", "--db", db, "--rules", _RETAIL, events)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(
        f"ingested 2, duplicates 0, dead-lettered {len(_SURROGATES)}")
    assert "s.jsonl:2: event \\ud800: field 'id': a lone UTF-16 surrogate (\\ud800) " \
           "is not text" in result.output
    assert "s.jsonl:8: event s7: field '\\ud800': the field name holds a lone UTF-16 " \
           "surrogate (\\ud800), which is not text" in result.output
    letters = _strict_json(_cli("dead-letters", "--db", db, "--json").stdout)
    assert len(letters) == len(_SURROGATES)
    for letter, (where, line) in zip(letters, _SURROGATES.items(), strict=True):
        assert "lone UTF-16 surrogate" in letter["reason"], (where, letter)
        assert letter["raw"] == line  # kept as given
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT id FROM events ORDER BY id").fetchall() == [("g1",),
                                                                                ("g2",)]
    # kept as given, a retry reads them again: still dead letters, kept once
    retry = _cli("dead-letters", "--db", db, "--rules", _RETAIL, "--retry")
    assert retry.exit_code == 2 and f"still dead-lettered {len(_SURROGATES)}" in retry.output


def test_lone_surrogates_through_the_library_and_the_store(tmp_path):
    from retention import Engine, EventError

    raws = [json.loads(line) for line in _SURROGATES.values()]
    engine = Engine.from_path(_RETAIL)
    for raw in raws[:-1]:  # (an identify is the store's)
        with pytest.raises(EventError, match="lone UTF-16 surrogate"):
            engine.process(raw)
    with Engine.open(tmp_path / "r.db", rules=_RETAIL) as store:
        report = store.ingest([_purchase("g1", "c1", "2026-01-01T10:00:00Z"), *raws])
        assert (report.ingested, report.dead_lettered) == (1, len(raws))
        with pytest.raises(EventError, match="lone UTF-16 surrogate"):
            store.process(raws[0])
        # a lone surrogate in the text given with an input, in its origin, or in an
        # input that is no event at all is stored as its escape
        from retention.errors import LineError
        from retention.store import Incoming
        odd = store.ingest([Incoming(raw=LineError("unreadable"), origin="file-\udcff.csv",
                                     line=3, text="a,\ud800,b", retriable=False),
                            ["\ud800"]])
        assert odd.dead_lettered == 2
        assert [(d["origin"], d["raw"]) for d in store.dead_letters()[-2:]] == [
            ("file-\\udcff.csv", "a,\\ud800,b"), ("api", '["\\ud800"]')]


def test_a_file_whose_name_is_not_utf8_keeps_its_dead_letters(tmp_path):
    import os

    if os.name != "posix":
        pytest.skip("file names of any bytes are POSIX's")
    name = os.fsdecode(b"events-\xff.jsonl")  # a surrogate escape in Python's str
    events = _lines(tmp_path / name, json.dumps(_purchase("g1", "c1", "2026-01-01T10:00:00Z")),
                    '{"id": "x"')
    result = _cli("ingest", "--db", tmp_path / "r.db", "--rules", _RETAIL, events)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "events-\\udcff.jsonl:2: invalid JSON" in result.output



# 7. NaN, Infinity and 1e400 are refused at ingest.

_NOT_JSON = {"NaN": "NaN is not a number JSON can hold",
             "Infinity": "an infinite number", "-Infinity": "an infinite number",
             "1e400": "an infinite number (or one too large for a float, such as 1e400)"}


def test_nan_and_infinity_in_json_lines_are_dead_letters_and_outputs_stay_json(tmp_path):
    db = tmp_path / "r.db"
    bad = [f'{{"id": "n{i}", "customer": "c1", "type": "purchase", '
           f'"at": "2026-01-0{i + 2}T00:00:00Z", "amount": {word}}}'
           for i, word in enumerate(_NOT_JSON)]
    bad.append('{"id": "n9", "customer": "c1", "type": "review", "at": "2026-01-09T00:00:00Z",'
               ' "scores": {"a": [1, NaN]}}')
    events = _lines(tmp_path / "n.jsonl",
                    json.dumps(_purchase("g1", "c1", "2026-01-01T10:00:00Z", amount=10)),
                    *bad)
    result = _cli("ingest", "--db", db, "--rules", _RETAIL, events)
    assert result.exit_code == 2, (result.output, result.exception)
    for number, (word, reason) in enumerate(_NOT_JSON.items(), 2):
        assert f"n.jsonl:{number}: event n{number - 2}: field 'amount': {reason}" in \
            result.output, word
    assert "event n9: field 'scores.a[1]': NaN is not a number JSON can hold" in result.output
    for args in (["decisions", "--db", db, "--json"], ["export", "--db", db, "c1"],
                 ["customer", "--db", db, "c1", "--json"], ["stats", "--db", db, "--json"],
                 ["dead-letters", "--db", db, "--json"]):
        done = _cli(*args)
        assert done.exit_code == 0, (args, done.output)
        _strict_json(done.stdout)
    exported = _strict_json(_cli("export", "--db", db, "c1").stdout)
    assert exported["state"]["spent"] == 10
    assert len(exported["dead_letters"]) == len(bad)


def test_nan_and_infinity_are_refused_by_the_library_and_the_store(tmp_path):
    from retention import Engine, EventError

    engine = Engine.from_path(_RETAIL)
    engine.process(_purchase("g1", "c1", "2026-01-01T10:00:00Z", amount=10))
    for value in (float("nan"), float("inf"), -float("inf"), [1.0, float("nan")],
                  {"deep": {"er": float("inf")}}):
        with pytest.raises(EventError, match="a number JSON can hold"):
            engine.process(_purchase("x", "c1", "2026-01-02T10:00:00Z", amount=value))
    assert engine.decisions("c1") == [] or all(
        _strict_json(json.dumps(d.to_dict())) for d in engine.decisions("c1"))
    with Engine.open(tmp_path / "r.db", rules=_RETAIL) as store:
        with pytest.raises(EventError, match="NaN is not a number JSON can hold"):
            store.process(_purchase("x", "c1", "2026-01-02T10:00:00Z", amount=float("nan")))
        report = store.ingest([_purchase("g1", "c1", "2026-01-01T10:00:00Z", amount=10),
                               _purchase("y", "c1", "2026-01-03T10:00:00Z",
                                         amount=float("inf"))])
        assert (report.ingested, report.dead_lettered) == (1, 1)
        assert store.snapshot("c1").spent == 10
        assert all(d["raw"] for d in store.dead_letters())


def test_csv_cells_that_read_nan_or_inf_stay_text(tmp_path):
    """A CSV cell is a number only in plain decimal notation: "nan", "inf" and "1e400"
    are text, never a NaN or an infinity (which JSON cannot hold)."""
    db = tmp_path / "r.db"
    events = _lines(tmp_path / "n.csv", "id,customer,type,at,amount,rating",
                    "n1,c1,purchase,2026-01-01T00:00:00Z,nan,inf",
                    "n2,c1,purchase,2026-01-02T00:00:00Z,1e400,-Infinity",
                    "n3,c1,purchase,2026-01-03T00:00:00Z,12.5,NaN")
    assert _cli("ingest", "--db", db, "--rules", _RETAIL, events).exit_code == 0
    exported = _strict_json(_cli("export", "--db", db, "c1").stdout)
    assert [(e["amount"], e["rating"]) for e in exported["events"]] == [
        ("nan", "inf"), ("1e400", "-Infinity"), (12.5, "NaN")]
    assert exported["state"]["spent"] == 12.5


def test_the_server_refuses_nan_with_its_reason(tmp_path):
    from retention.store import StoredEngine
    from tests.test_server import config_of, create_app, serving

    db = tmp_path / "shop.db"
    StoredEngine(db, _RETAIL).close()
    with serving(create_app(config_of(db))) as server:
        body = (b'[{"id": "g1", "customer": "c1", "type": "purchase", "amount": 10,'
                b' "at": "2026-01-01T10:00:00Z"},'
                b' {"id": "n1", "customer": "c1", "type": "purchase", "amount": NaN,'
                b' "at": "2026-01-02T10:00:00Z"},'
                b' {"id": "n2", "customer": "c1", "type": "purchase", "amount": 1e400,'
                b' "at": "2026-01-03T10:00:00Z"}]')
        reply = server.post("/events", raw=body)
        assert reply.status == 422, reply
        assert (reply.body["new"], reply.body["dead_lettered"]) == (1, 2)
        assert "NaN is not a number JSON can hold" in reply.body["errors"][0]
        assert "an infinite number" in reply.body["errors"][1]
        shown = server.get("/customers/c1?at=2026-02-01T00:00:00Z")
        assert shown.status == 200, shown
        assert shown.body["customer"] == "c1"



# 8. A CSV cell of thousands of digits is a dead letter.

def test_a_csv_cell_of_thousands_of_digits_is_a_dead_letter_and_the_rest_lands(tmp_path):
    db = tmp_path / "r.db"
    events = _lines(tmp_path / "d.csv", "id,customer,type,at,amount",
                    "d1,c1,purchase,2026-01-01T00:00:00Z,10",
                    "d2,c1,purchase,2026-01-02T00:00:00Z," + "9" * 5000,
                    "d3,c1,purchase,2026-01-03T00:00:00Z,-" + "9" * 30,
                    "d4,c1,purchase,2026-01-04T00:00:00Z,9223372036854775807")
    result = _cli("ingest", "--db", db, "--rules", _RETAIL, events)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.output.replace(f"{tmp_path}/", "").strip().splitlines()
    assert lines[0] == ("d.csv:3: column 'amount': a number of 5000 digits is too large to "
                        "count with (an event's numbers are at most 9,223,372,036,854,775,807"
                        " in magnitude)")
    assert lines[1] == ("d.csv:4: event d3: field 'amount': a number too large to count with "
                        "(an event's numbers are at most 9,223,372,036,854,775,807 in "
                        "magnitude)")
    assert lines[-1].startswith("ingested 2, duplicates 0, dead-lettered 2")
    with sqlite3.connect(db) as conn:
        assert [i for (i,) in conn.execute("SELECT id FROM events ORDER BY id")] == ["d1", "d4"]


def test_numbers_past_the_bound_are_dead_letters_in_json_lines_and_the_library(tmp_path):
    from retention import Engine, EventError

    db = tmp_path / "r.db"
    events = _lines(tmp_path / "d.jsonl",
                    json.dumps(_purchase("d1", "c1", "2026-01-01T00:00:00Z", amount=10)),
                    '{"id": "d2", "customer": "c1", "type": "purchase", '
                    '"at": "2026-01-02T00:00:00Z", "amount": ' + "9" * 5000 + "}",
                    '{"id": "d3", "customer": "c1", "type": "purchase", '
                    '"at": "2026-01-03T00:00:00Z", "amount": ' + "9" * 30 + "}",
                    '{"id": ' + "7" * 25 + ', "customer": "c1", "type": "purchase", '
                    '"at": "2026-01-04T00:00:00Z"}')
    result = _cli("ingest", "--db", db, "--rules", _RETAIL, events)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.output.replace(f"{tmp_path}/", "").strip().splitlines()
    assert lines[0] == ("d.jsonl:2: invalid JSON: a number of more than 4300 digits (an "
                        "event's numbers are at most 9,223,372,036,854,775,807 in magnitude)")
    assert lines[1].startswith("d.jsonl:3: event d3: field 'amount': a number too large to "
                               "count with")
    assert lines[2].startswith("d.jsonl:4: event: field 'id': a number too large to count")
    assert lines[-1].startswith("ingested 1, duplicates 0, dead-lettered 3")

    engine = Engine.from_path(_RETAIL)
    for raw in (_purchase("x", "c1", "2026-01-01T00:00:00Z", amount=10**30),
                _purchase("x", "c1", "2026-01-01T00:00:00Z", amount=-(10**5000)),
                _purchase(10**5000, "c1", "2026-01-01T00:00:00Z"),
                _purchase("x", 10**5000, "2026-01-01T00:00:00Z"),
                {**_purchase("x", "c1", "2026-01-01T00:00:00Z"), "source": 10**5000},
                _purchase("x", "c1", "2026-01-01T00:00:00Z", items=[{"qty": 2**63}])):
        with pytest.raises(EventError, match="too large to count with"):
            engine.process(raw)
    engine.process(_purchase("ok", "c1", "2026-01-01T00:00:00Z", amount=2**63 - 1,
                             share=-9.2e18))
    with Engine.open(db) as store:  # the same refusals, kept as dead letters
        report = store.ingest([_purchase(10**5000, "c9", "2026-01-01T00:00:00Z"),
                               _purchase("big", "c9", "2026-01-01T00:00:00Z", n=10**19)])
        assert (report.ingested, report.dead_lettered) == (0, 2)



# 9. YAML tags and odd names are load errors.



# 10. forget leaves no trace.

_WHO, _EMAIL = "cust-priv-1", "email:ann@example.com"
#: dead letters that name the customer, each in another spelling
_NAMING = [
    # escaped, in a field that is not the customer
    r'{"id": "d1", "customer": "x", "type": "purchase", "referrer": "cust\u002dpriv-1"}',
    # escaped, in a line that is not JSON at all (cut short)
    r'{"id": "d2", "customer": "cust\u002dpriv\u002d1", "type": "purch',
    # only the address, in free text, in another case
    '{"id": "d3", "customer": "zz", "type": "complaint", "text": "Ann@Example.com wrote"}',
    # the id in free text
    '{"id": "d4", "customer": "zz", "type": "complaint", "text": "about cust-priv-1, again"}',
    # the address JSON-escaped in free text
    r'{"id": "d5", "customer": "zz", "type": "note", "text": "mail ann\u0040example.com"}',
]
#: dead letters of others, whose identifiers only look alike
_OTHERS = [
    '{"id": "u1", "customer": "cust-priv-10", "type": "purchase"}',
    '{"id": "u2", "customer": "zz", "type": "note", "text": "joann@example.com, cust-priv-1x"}',
    '{"id": "u3", "customer": "ann@example.community", "type": "purchase"}',
]
#: what must not remain in the file: the id and the address, in any JSON spelling
_TRACES = [re.compile(rb"cust(-|\\u002d)priv(-|\\u002d)1(?![0-9x])"),
           re.compile(rb"(?i)(?<![a-z])ann(@|\\u0040)example\.com(?!\.?[a-z])")]


def _file_bytes(db):
    return b"".join(p.read_bytes() for p in sorted(db.parent.iterdir())
                    if p.name.startswith(db.name))


def _private_customer(store):
    from retention.errors import LineError
    from retention.models import parse_json_line
    from retention.store import Incoming

    store.ingest([_purchase("p1", _WHO, "2026-01-01T10:00:00Z", amount=10),
                  {"type": "identify", "customer": _WHO, "aliases": [_EMAIL]}])
    letters = [Incoming(raw=parse_json_line(line), origin="in.jsonl", line=n, text=line)
               for n, line in enumerate(_NAMING + _OTHERS, 1)]
    letters.append(Incoming(raw=LineError("3 cells for 5 columns"), origin="in.csv", line=2,
                            text="d6,cust-priv-1,purchase", retriable=False))
    report = store.ingest(letters)
    assert report.dead_lettered == len(letters)


def test_forget_erases_the_dead_letters_that_name_the_customer_in_any_spelling(tmp_path):
    from retention import Engine

    db = tmp_path / "r.db"
    with Engine.open(db, rules=_RETAIL) as store:
        _private_customer(store)
        named = store.export(_EMAIL)["dead_letters"]
        assert sorted(d["raw"] for d in named) == sorted(
            [*_NAMING, "d6,cust-priv-1,purchase"])
        erased = store.forget(_EMAIL)
        assert erased["dead_letters"] == len(_NAMING) + 1
        assert sorted(d["raw"] for d in store.dead_letters()) == sorted(_OTHERS)
    raw = _file_bytes(db)
    for trace in _TRACES:
        assert not trace.search(raw), trace.search(raw)
    assert b"cust-priv-10" in raw and b"joann@example.com" in raw  # the others stay


def test_forget_when_the_file_cannot_be_vacuumed_says_the_erasure_is_committed(tmp_path):
    """A full disk, as the kernel enforces a file-size limit (RLIMIT_FSIZE): the
    erasure commits (its log is small), VACUUM (which writes the whole file again)
    fails. forget says what happened, exits 2, and a later forget finishes."""
    import os
    import subprocess
    import sys

    resource = pytest.importorskip("resource")
    import signal

    from retention import Engine

    db = tmp_path / "r.db"
    with open(_ROOT / "examples" / "events" / "retail.jsonl", encoding="utf-8") as lines:
        history = [json.loads(next(lines)) for _ in range(6000)]
    with Engine.open(db, rules=_RETAIL) as store:
        store.ingest(history)
        _private_customer(store)
    size = db.stat().st_size
    assert size > 1 << 20 and not Path(f"{db}-wal").exists()

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    def forget(limit):
        return subprocess.run(
            [sys.executable, "-m", "retention.cli", "forget", "--db", str(db), _WHO, "--yes"],
            preexec_fn=full_disk if limit else None, capture_output=True, text=True,
            cwd=_ROOT, env={**os.environ, "PYTHONPATH": str(_ROOT)}, timeout=60)

    failed = forget(limit=True)
    assert failed.returncode == 2, (failed.stdout, failed.stderr)
    assert "Traceback" not in failed.stderr
    assert re.match(rf"^erased 1 event, 1 snapshot, \d+ ledger entr(y|ies), 1 alias, "
                    rf"\d+ decisions?, {len(_NAMING) + 1} dead letters of {_WHO}; "
                    "database not vacuumed yet$", failed.stdout.strip()), failed.stdout
    warning = failed.stderr.strip()
    assert len(warning.splitlines()) == 1, warning
    assert warning.startswith(f"warning: {db}: {_WHO} is erased (committed), but the file "
                              "could not be vacuumed (")
    assert f"make room, then run `retention forget {_WHO}` again" in warning
    # the erasure is committed: nothing is held about them any more
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE customer = ?",
                            [_WHO]).fetchone() == (0,)
        # (and marked for the next forget to finish)
        assert conn.execute("SELECT count(*) FROM meta WHERE key = 'scrub_pending'"
                            ).fetchone() == (1,)
    assert db.stat().st_size >= size * 0.95  # the space is not reclaimed

    done = forget(limit=False)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stdout.strip() == (f"nothing held about {_WHO}; the scrub an earlier "
                                   "erasure left pending is done: database vacuumed")
    assert db.stat().st_size < size
    raw = _file_bytes(db)
    for trace in _TRACES:
        assert not trace.search(raw), trace.search(raw)
    again = forget(limit=False)
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: unknown customer {_WHO!r}: nothing erased"



# 11. Slow clients are dropped.



# 12. deliver --backoff 0 tries each decision once per run.
