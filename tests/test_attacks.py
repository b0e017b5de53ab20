"""The attack list: each hostile input found against the engine, store, server,
sinks and rule files, refused or bounded. Read this module to see what the
project defends against; each section is one finding, numbered as in the issue
that listed them, and each test failed on the code before its fix.
"""

import contextlib
import json
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from retention.server import create_app

# 1. Replay race: one signed event sent on many connections at once is stored once.

SECRET = "a shared secret"
BINARY = {"ce-specversion": "1.0", "ce-id": "ce-1", "ce-source": "/shop", "ce-type": "purchase",
          "ce-time": "2026-03-02T08:30:00Z", "ce-subject": "ann",
          "Content-Type": "application/json"}


@pytest.fixture
def signed(tmp_path):
    """A server that checks Standard Webhooks signatures, on a real socket."""
    from retention.store import StoredEngine
    from tests.test_server import RETAIL, config_of, serving

    db = tmp_path / "shop.db"
    StoredEngine(db, RETAIL).close()
    with serving(create_app(config_of(db, {"standard.secret": SECRET}))) as server:
        yield server, db


def at_once(clients: int, send: Any) -> list[Any]:
    """``send(n)`` on ``clients`` threads released together; their replies."""
    barrier = threading.Barrier(clients)
    replies: dict[int, Any] = {}

    def client(n: int) -> None:
        barrier.wait(10)
        replies[n] = send(n)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(replies) == clients, "a client did not get its answer"
    return [replies[n] for n in range(clients)]


@contextlib.contextmanager
def database_held(db: Path):
    """Another process's write transaction on ``db``: the server's writer waits for it
    (SQLite's busy timeout), so every request of a burst is in flight at once."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("mode", ["binary", "structured", "batch"])
def test_one_signed_message_on_20_connections_at_once_is_stored_once(signed, mode):
    from tests.test_server import rows, sign

    server, db = signed
    if mode == "binary":
        body, headers = json.dumps({"amount": 55}).encode(), BINARY
    else:
        event = {"specversion": "1.0", "id": "ce-1", "source": "/shop", "type": "purchase",
                 "time": "2026-03-02T08:30:00Z", "subject": "ann", "data": {"amount": 55}}
        kind = "cloudevents+json" if mode == "structured" else "cloudevents-batch+json"
        body = json.dumps(event if mode == "structured" else [event]).encode()
        headers = {"Content-Type": f"application/{kind}"}
    headers = {**headers, **sign(SECRET.encode(), body, "msg_once")}
    replies: list[Any] = []

    def send(n: int) -> Any:
        # binary mode: each copy with its own ce-id and ce-subject, outside the signature
        changed = {"ce-id": f"copy-{n}", "ce-subject": f"victim-{n}"} if n and \
            mode == "binary" else {}
        reply = server.post("/events", raw=body, headers={**headers, **changed})
        replies.append(reply)
        return reply

    with database_held(db):
        # while the first copy waits for the database, the others are answered
        burst = threading.Thread(target=at_once, args=(20, send))
        burst.start()
        wait_for(lambda: len(replies) >= 19, 5)
    burst.join(30)
    answers = replies
    assert len(answers) == 20
    stored = [r for r in answers if r.status == 200 and r.body.get("new") == 1]
    refused = [r for r in answers if r.body.get("replayed") is True]
    assert len(stored) == 1, answers
    assert len(refused) == 19, answers
    assert all(r.status == 409 and "msg_once" in r.body["error"] for r in refused), refused
    assert rows(db, "SELECT count(*) FROM events") == [(1,)]
    # once stored, the same message again is answered as already used
    late = server.post("/events", raw=body, headers={**headers, "ce-id": "late"})
    assert (late.status, late.body["replayed"], late.body["new"]) == (200, True, 0)
    assert rows(db, "SELECT count(*) FROM events") == [(1,)]




def test_a_signed_message_used_on_events_cannot_be_used_again_on_hooks_standard(signed):
    from tests.test_server import rows, sign

    server, db = signed  # /hooks/standard checks the same secret
    body = json.dumps({"amount": 55}).encode()
    headers = {**BINARY, **sign(SECRET.encode(), body, "msg_x")}
    assert server.post("/events", raw=body, headers=headers).body["new"] == 1
    copy = server.post("/hooks/standard", raw=body, headers={**headers, "ce-id": "copy"})
    assert (copy.status, copy.body.get("replayed")) == (200, True), copy.body
    assert rows(db, "SELECT id FROM events") == [("ce-1",)]


@pytest.mark.parametrize("change", ["webhook-id", "webhook-timestamp"])
def test_a_captured_signature_does_not_sign_another_id_or_time(signed, change):
    from tests.test_server import rows, sign

    server, db = signed
    body = json.dumps({"amount": 55}).encode()
    headers = {**BINARY, **sign(SECRET.encode(), body, "msg_y")}
    assert server.post("/events", raw=body, headers=headers).body["new"] == 1
    # (another time than the signed one, whatever second it is now)
    new_value = "msg_z" if change == "webhook-id" else str(int(headers["webhook-timestamp"]) - 1)
    forged = server.post("/events", raw=body,
                         headers={**headers, change: new_value, "ce-id": "copy"})
    assert (forged.status, forged.body["error"]) == (401, "bad signature"), forged.body
    assert rows(db, "SELECT id FROM events") == [("ce-1",)]


@pytest.mark.parametrize("spelling", ["0{}", "+{}", "{}\t", "{:_}"],
                         ids=["leading-zero", "plus", "tab", "underscores"])
def test_another_spelling_of_the_signed_timestamp_is_the_same_message(signed, spelling):
    from tests.test_server import rows, sign

    server, db = signed
    body = json.dumps({"amount": 55}).encode()
    headers = {**BINARY, **sign(SECRET.encode(), body, "msg_t")}
    assert server.post("/events", raw=body, headers=headers).body["new"] == 1
    respelt = spelling.format(int(headers["webhook-timestamp"]))
    copy = server.post("/events", raw=body, headers={
        **headers, "webhook-timestamp": respelt, "ce-id": "copy"})
    assert copy.body.get("replayed") is True or copy.status == 401, copy.body
    assert rows(db, "SELECT id FROM events") == [("ce-1",)]

def test_a_signed_message_stored_before_a_restart_is_not_stored_again(tmp_path):
    """The guard was in memory: after a restart, a signed binary CloudEvent with a new
    unsigned ce-id was stored again. The database remembers what it stored."""
    from retention.store import StoredEngine
    from tests.test_server import RETAIL, config_of, rows, serving, sign

    db = tmp_path / "shop.db"
    StoredEngine(db, RETAIL).close()
    body = json.dumps({"amount": 55}).encode()
    headers = {**BINARY, **sign(SECRET.encode(), body, "msg_restart")}
    with serving(create_app(config_of(db, {"standard.secret": SECRET}))) as server:
        first = server.post("/events", raw=body, headers=headers)
        assert first.status == 200 and first.body["new"] == 1, first.body
    with serving(create_app(config_of(db, {"standard.secret": SECRET}))) as again:
        copy = again.post("/events", raw=body, headers={**headers, "ce-id": "copy"})
        assert copy.status == 200 and copy.body.get("replayed") is True, copy.body
        other = json.dumps({"amount": 56}).encode()  # another message still goes in
        fresh = again.post("/events", raw=other,
                           headers={**BINARY, "ce-id": "ce-2",
                                    **sign(SECRET.encode(), other, "msg_other")})
        assert fresh.status == 200 and fresh.body["new"] == 1, fresh.body
    assert rows(db, "SELECT id FROM events ORDER BY id") == [("ce-1",), ("ce-2",)]


# 2. Email header injection through encoded words.

_MAIL_RULES = """\
capital: {initial: 70, min: 0, max: 100, opens_on: [purchase]}
rules:
  billing_error: {when: event.type == "billing_error", points: -10, then: [billing_apology]}
actions:
  billing_apology: {kind: service, via: email, template: billing}
"""
#: a template that puts the customer id in a header line, and the body it must keep
_MAIL_TEMPLATE = "Subject: About the invoice of ${customer}\nX-Customer: ${customer}\n\n"
_MAIL_BODY = "We are sorry about the billing error.\n"
#: the headers of every message the sink writes with that template
_MAIL_HEADERS = {"subject", "x-customer", "from", "to", "date", "message-id",
                 "x-retention-decision", "content-type", "content-transfer-encoding",
                 "mime-version"}


def _mail_shop(tmp_path, template=_MAIL_TEMPLATE + _MAIL_BODY):
    folder = tmp_path / "rules"
    (folder / "templates").mkdir(parents=True)
    (folder / "shop.yaml").write_text(_MAIL_RULES, encoding="utf-8")
    (folder / "templates" / "billing.txt").write_text(template, encoding="utf-8")
    return folder


def _deliver_billing_email(tmp_path, smtp, customer, email="ann@example.com", **template):
    """`retention ingest` a billing error of ``customer`` (its address linked by an
    identify event) and `retention deliver` its email to the SMTP server on loopback;
    the result of deliver and the outbox rows (status, reason)."""
    import json
    import sqlite3
    from contextlib import closing
    from datetime import UTC, datetime, timedelta

    from click.testing import CliRunner

    from retention.cli import cli

    rules, db = _mail_shop(tmp_path, **template), tmp_path / "shop.db"
    yesterday = datetime.now(UTC) - timedelta(days=1)
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(e) + "\n" for e in (
        {"type": "identify", "customer": customer, "aliases": [f"email:{email}"]},
        {"id": "p1", "customer": customer, "type": "purchase", "amount": 30,
         "at": yesterday.isoformat()},
        {"id": "b1", "customer": customer, "type": "billing_error",
         "at": (yesterday + timedelta(hours=1)).isoformat()})), encoding="utf-8")
    runner = CliRunner()
    ingest = runner.invoke(cli, ["ingest", "--db", str(db), "--rules", str(rules), str(events)])
    assert ingest.exit_code == 0, ingest.output
    result = runner.invoke(cli, [
        "deliver", "--db", str(db), "--rules", str(rules),
        "--set", "email.host=127.0.0.1", "--set", f"email.port={smtp.port}",
        "--set", "email.from=Shop <care@shop.example>"])
    with closing(sqlite3.connect(db)) as conn:
        return result, conn.execute("SELECT status, reason FROM decisions").fetchall()


@pytest.fixture
def smtp():
    from .servers import SmtpServer

    server = SmtpServer().start()
    yield server
    server.stop()


def _q(text):
    from email import quoprimime
    return quoprimime.header_encode(text.encode(), "utf-8")


def _b(text):
    import base64
    return "=?utf-8?b?" + base64.b64encode(text.encode()).decode() + "?="


_INJECTED = "Ann\r\nReply-To: phish@evil.example\r\nBcc: eve@evil.example\r\n\r\nClick here"
#: customer ids that a reader would decode into header lines and a body, if they
#: reached a header line as they are
ENCODED_WORDS = {
    "quoted-printable, as in the finding":
        "=?utf-8?q?Ann=0D=0AReply-To:_phish@evil.example=0D=0A=0D=0AClick_here?=",
    "quoted-printable": _q(_INJECTED),
    "base64": _b(_INJECTED),
    "split over encoded words and folding white space": (
        _q("Ann") + " " + _q("\r\n Reply-To: phish@evil.example") + " " + _b("\r\n\r\nhi")),
    "another charset, a name with an accent": (
        "Zoë =?iso-8859-1?q?=0D=0AReply-To:_phish@evil.example?="),
    "long enough to be folded": "customer " * 6 + _b(_INJECTED) + " end",
}


@pytest.mark.parametrize("customer", list(ENCODED_WORDS.values()), ids=list(ENCODED_WORDS))
def test_an_encoded_word_in_a_value_stays_text_in_its_header(tmp_path, smtp, customer):
    result, outbox = _deliver_billing_email(tmp_path, smtp, customer)
    assert result.exit_code == 0, result.output
    assert outbox == [("sent", None)]
    [mail] = smtp.mailbox.received
    assert mail.rcpt_tos == ["ann@example.com"]
    message = mail.message  # parsed by the email library from what the server received
    assert {name.lower() for name in message} == _MAIL_HEADERS
    assert message["Reply-To"] is None and message["Bcc"] is None
    assert message["Subject"] == f"About the invoice of {customer}"
    assert message["X-Customer"] == customer
    assert message.get_content().replace("\r\n", "\n") == _MAIL_BODY
    assert not message.defects


@pytest.mark.parametrize("separator", ["\r\n", "\n", "\r", "\u2028", "\u2029", "\x85", "\x0b",
                                       "\x0c", "\x1c"])
def test_a_line_break_of_any_kind_in_a_header_value_is_refused(tmp_path, smtp, separator):
    # every line boundary str.splitlines knows: a reader splitting on one must not find
    # a header line (the sink is called directly: ingest may refuse such ids already)
    from datetime import UTC, datetime

    from retention.delivery import Delivery, DeliveryError, Settings
    from retention.models import Decision
    from retention.plugins.email import EmailSink
    from retention.rules.model import Action

    rules = _mail_shop(tmp_path)
    sink = EmailSink(Settings({"email.host": "127.0.0.1", "email.port": str(smtp.port),
                               "email.from": "care@shop.example"}, environ={}))
    customer = f"Ann{separator}Reply-To: phish@evil.example"
    decision = Decision(id="d1", customer=customer, rule="billing_error",
                        action="billing_apology", params={}, at=datetime.now(UTC),
                        kind="service", via="email", trigger="b1")
    action = Action(name="billing_apology", kind="service", via="email",
                    params={"template": "billing"})
    try:
        with pytest.raises(DeliveryError, match="a value has a line break") as refused:
            sink.deliver(Delivery(decision=decision, action=action,
                                  identifiers=("email:ann@example.com",),
                                  templates=rules / "templates"))
    finally:
        sink.close()
    assert refused.value.permanent
    assert smtp.mailbox.received == []


@pytest.mark.parametrize("email", [
    "=?utf-8?q?ann=0D=0ABcc=3A_eve=40evil.example=0D=0A?=@example.com",
    "ann@example.com, eve@evil.example",
    "Ann <ann@example.com>",
    "=?utf-8?q?Ann=0D=0ABcc:_eve@evil.example?= <ann@example.com>",
])
def test_an_address_from_an_event_is_one_plain_address_or_nothing_is_sent(
        tmp_path, smtp, email):
    # the recipient comes from an identify event: it goes to To and to the envelope
    result, outbox = _deliver_billing_email(tmp_path, smtp, "ann", email=email)
    assert result.exit_code == 2, result.output
    assert outbox == [("failed", f"{email!r} is not one email address")]
    assert smtp.mailbox.received == []


def test_a_template_address_header_takes_only_plain_addresses(tmp_path, smtp):
    template = ("Subject: Your invoice\nReply-To: Care Team <care@shop.example>, "
                "Zoë <zoe@shop.example>\n\n" + _MAIL_BODY)
    result, outbox = _deliver_billing_email(tmp_path / "fixed", smtp, "ann", template=template)
    assert result.exit_code == 0, result.output
    [mail] = smtp.mailbox.received
    assert [(a.display_name, a.addr_spec) for a in mail.message["Reply-To"].addresses] == [
        ("Care Team", "care@shop.example"), ("Zoë", "zoe@shop.example")]
    # a value there that is not plain addresses (an encoded word with a colon, which an
    # address parser takes for a group and half drops) is refused, not rewritten
    sneaky = "=?utf-8?q?Ann=0D=0AX-Evil:_1?= <ann@example.com>"
    result, outbox = _deliver_billing_email(
        tmp_path / "filled", smtp, sneaky,
        template="Subject: Your invoice\nReply-To: ${customer}\n\n" + _MAIL_BODY)
    assert result.exit_code == 2, result.output
    [(status, reason)] = outbox
    assert status == "failed" and reason.endswith(
        f"Reply-To: {sneaky!r} is not a list of plain email addresses"), reason
    assert len(smtp.mailbox.received) == 1


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
def _ledger_rules(engine, customer):
    return {entry.rule for entry in engine.explain(customer)}


def test_round_refuses_digits_that_would_build_an_enormous_power():
    from retention import Engine, load_texts

    engine = Engine(load_texts([("r.yaml", (
        "rules:\n"
        "  rounded:\n"
        "    when: event.type == \"purchase\" and round(event.amount, event.precision) == 0\n"
        "    points: -5\n"))]))
    # round(12, -1000) would compute 10**1000 first; round(12, -10**10) never returns
    for n, digits in enumerate((-1000, -10_000_000_000, 2**62, True, 2.5)):
        engine.process({"id": f"p{n}", "customer": f"c{n}", "type": "purchase",
                        "at": "2026-01-01T00:00:00Z", "amount": 12, "precision": digits})
        assert "rounded" not in _ledger_rules(engine, f"c{n}"), digits
    engine.process({"id": "ok", "customer": "fine", "type": "purchase",
                    "at": "2026-01-01T00:00:00Z", "amount": 12, "precision": -2})
    assert "rounded" in _ledger_rules(engine, "fine")  # round(12, -2) == 0 still matches


def test_round_says_why_it_refuses():
    import pytest

    from retention.plugins.functions import round_

    with pytest.raises(ValueError, match="digits must be a whole number from -308 to 308"):
        round_(12, -10_000_000_000)
    assert round_(12345, -3) == 12000 and round_(1.256, 2) == 1.26 and round_(2.5) == 2


def test_arithmetic_on_whole_numbers_past_64_bits_is_missing():
    from types import SimpleNamespace

    from retention.rules.expressions import compile_condition

    event = SimpleNamespace(id="e", customer="c", type="t", at=None, source="")
    # 190 factors of a 4,000-digit field took a second per event, for one rule
    huge = int("9" * 4000)
    product = compile_condition(" * ".join(["event.a"] * 190) + " > 0")
    assert product(event, {"a": huge}, None) is False
    assert product.reference(event, {"a": huge}, None) is False
    square = compile_condition("event.a * event.a > 0")
    assert square(event, {"a": 2**40}, None) is False  # 2**80: past 64 bits
    assert square(event, {"a": 2**31}, None) is True
    assert compile_condition("event.a + 1 > 0")(event, {"a": huge}, None) is False
    repeat = compile_condition('"ab" * event.n == "abab"')
    assert repeat(event, {"n": 10**9}, None) is False  # text is never repeated




def test_event_values_a_condition_reads_are_bounded():
    """A condition of many `in` tests over a 120,000-item list took 300 ms an event;
    texts, lists and ids past their bounds are refused at the way in."""
    import pytest

    from retention import Engine, examples
    from retention.errors import EventError
    from retention.models import MAX_ITEMS, MAX_NAME, MAX_TEXT

    engine = Engine.from_path(examples.RULES)
    base = {"customer": "c", "type": "purchase", "at": "2026-01-01T00:00:00Z"}
    for n, extra in enumerate(({"items": list(range(MAX_ITEMS + 1))},
                               {"text": "x" * (MAX_TEXT + 1)},
                               {"nested": {"deep": [{"text": "y" * (MAX_TEXT + 1)}]}},
                               {"customer": "c" * (MAX_NAME + 1)})):
        with pytest.raises(EventError, match="more than"):
            engine.process({**base, "id": f"e{n}", **extra})
    fine = engine.process({**base, "id": "ok", "items": list(range(MAX_ITEMS)),
                           "text": "x" * MAX_TEXT})
    assert fine.capital_after == 72


# 5. Rule files are bounded.
def _load_problems(text):
    import pytest

    from retention import RuleFileError, load_texts

    with pytest.raises(RuleFileError) as caught:
        load_texts([("r.yaml", text)])
    return [str(p) for p in caught.value.problems]


def test_a_rule_file_past_one_mebibyte_is_refused_before_it_is_read(tmp_path):
    import pytest

    from retention import RuleFileError, load_rules
    from retention.rules.loader import MAX_BYTES

    comments = "# " + "x" * (MAX_BYTES - 3) + "\n"  # 100 MB of these took 48 s
    assert len(comments) == MAX_BYTES
    (tmp_path / "ok.yaml").write_text(comments)
    assert load_rules(tmp_path / "ok.yaml").rules == ()
    assert _load_problems(comments + "#\n") == [
        f"r.yaml:1:1: too large: this rule file holds {MAX_BYTES + 2:,} bytes; "
        f"a rule set is limited to {MAX_BYTES:,} bytes (1 MiB)"]
    # not even read: bytes that are not text are refused for their size alone
    (tmp_path / "big.yaml").write_bytes(b"\xff" * (MAX_BYTES + 1))
    with pytest.raises(RuleFileError, match=r"big.yaml:1:1: too large"):
        load_rules(tmp_path / "big.yaml")
    # a folder counts its files together
    (tmp_path / "ok.yaml").write_text(comments[: MAX_BYTES // 2])
    (tmp_path / "big.yaml").write_text(comments[: MAX_BYTES // 2 + 1])
    with pytest.raises(RuleFileError, match="the rule files up to this one hold"):
        load_rules(tmp_path)


def test_too_many_rules_are_refused_before_their_conditions_compile():
    from retention import load_texts
    from retention.rules.loader import MAX_ENTRIES

    def rules(n):
        return "rules:\n" + "".join(f"  r{i}: {{when: event.x == {i}}}\n" for i in range(n))

    assert len(load_texts([("r.yaml", rules(MAX_ENTRIES["rules"]))]).rules) == 1000
    assert _load_problems(rules(MAX_ENTRIES["rules"] + 1)) == [
        "r.yaml:1:1: too many rules: a rule set has at most 1,000"]
    levels = "levels:\n" + "".join(f"  - {{name: l{i}, below: {i}}}\n" for i in range(101))
    assert _load_problems(levels) == ["r.yaml:1:1: too many levels: a rule set has at most 100"]


def test_conditions_and_nesting_are_bounded():
    from retention.rules.expressions import MAX_LENGTH

    long = "event.a == 1" + " or event.a == 1" * (MAX_LENGTH // 16)
    assert len(long) > MAX_LENGTH
    assert _load_problems(f"rules:\n  a: {{when: {long}}}\n") == [
        "r.yaml:2:13: a condition is limited to 2,000 characters"]
    deep = "[" * 40 + "]" * 40
    assert _load_problems(f"rules:\n  a: {{when: event.x, then: {deep}}}\n") == [
        "r.yaml:2:58: nested more than 32 levels deep"]




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
def test_a_yaml_tag_is_a_load_error_at_its_position():
    python_object = (
        "rules:\n"
        "  a: !!python/object:collections.OrderedDict\n"
        "    when: event.type == \"x\"\n"
        "    points: -1\n")
    assert _load_problems(python_object) == [
        "r.yaml:2:6: YAML tag '!!python/object:collections.OrderedDict' is not allowed in "
        "a rule file: write plain values (quote a text, \"5\")"]
    found = _load_problems("capital: {initial: !!float 70, max: !custom 90}\n")
    assert [p.split(": YAML tag")[0] for p in found] == ["r.yaml:1:20", "r.yaml:1:37"]
    assert "'!!str'" in _load_problems("rules:\n  a: {when: !!str event.x}\n")[0]


def test_names_with_line_breaks_or_punctuation_are_load_errors():
    rule = _load_problems('rules:\n  "r1\\n": {when: event.type == "x"}\n')
    assert rule == ["r.yaml:2:3: 'r1\\n' is not a valid name (letters, digits, _ and -, "
                    "starting with a letter, at most 64 characters)"]
    level = _load_problems('levels:\n  - {name: "watch\\n", below: 50}\n')
    assert level[0].startswith("r.yaml:2:12: 'watch\\n' is not a valid name")
    action = _load_problems('actions:\n  "tag me": {kind: in_purchase}\n')
    assert action[0].startswith("r.yaml:2:3: 'tag me' is not a valid name")
    reward = _load_problems("recognition:\n  " + "r" * 65 + ": {every: 2, when: event.x, "
                            "then: [a]}\nactions:\n  a: {kind: in_purchase}\n")
    assert reward[0].startswith("r.yaml:2:3: '" + "r" * 65 + "' is not a valid name")




def test_a_number_of_thousands_of_digits_in_a_rule_file_is_one_error_at_its_place(tmp_path):
    from retention import load_rules
    from retention.errors import RuleFileError

    for text, where in (('rules:\n  r: {when: event.type == "a", points: %s}\n', (2, 40)),
                        ("%s\n", (1, 1))):
        path = tmp_path / "big.yaml"
        path.write_text(text % ("9" * 5000))
        with pytest.raises(RuleFileError) as caught:
            load_rules(path)
        (problem,) = caught.value.problems
        assert (problem.line, problem.column) == where
        assert "not a number or text this file can hold" in problem.message


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

DEADLINE = 0.3  # the header, body and keep-alive timeouts of the served process, in s


@pytest.fixture(scope="module")
def impatient(tmp_path_factory):
    """``retention serve`` with sub-second timeouts, given as its options."""
    from retention.store import StoredEngine
    from tests.servers import retention_serve
    from tests.test_server import RETAIL

    db = tmp_path_factory.mktemp("impatient") / "shop.db"
    StoredEngine(db, RETAIL).close()
    served = retention_serve(db, RETAIL, "--header-timeout", str(DEADLINE),
                             "--body-timeout", str(DEADLINE), "--keep-alive", str(DEADLINE),
                             "--max-header", "8192", "--deliver-every", "0")
    yield served
    served.stop()


def dropped(sock: Any, *, sending: bytes = b"", every: float = 0.0) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock``, and what it answered meanwhile;
    ``sending`` goes out a byte each ``every`` seconds until then. Fails after 5 s."""
    start = time.monotonic()
    sock.settimeout(every or 5)
    answer, pending = b"", iter(sending)
    while time.monotonic() - start < 5:
        byte = next(pending, None)
        try:
            if byte is not None:
                sock.sendall(bytes([byte]))
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            return time.monotonic() - start, answer
        answer += data
    raise AssertionError(f"still open after 5 s; answered {answer!r}")


def connect(served: Any) -> Any:
    import socket

    return socket.create_connection(("127.0.0.1", served.port), timeout=5)


def test_a_client_that_sends_half_its_headers_and_stops_is_dropped(impatient):
    with connect(impatient) as sock:
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: shop\r\nContent-Ty")
        seconds, answer = dropped(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert DEADLINE * 0.9 <= seconds < DEADLINE + 2, seconds


def test_headers_sent_a_byte_at_a_time_do_not_extend_the_deadline(impatient):
    headers = b"GET /health HTTP/1.1\r\nHost: shop\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"
    with connect(impatient) as sock:
        seconds, answer = dropped(sock, sending=headers, every=DEADLINE / 10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer  # not the 200 of /health
    assert seconds < DEADLINE + 2, seconds


def test_a_client_that_sends_half_its_body_and_stops_gets_408(impatient):
    from tests.test_server import rows

    with connect(impatient) as sock:
        sock.sendall(b"POST /events HTTP/1.1\r\nHost: shop\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 200\r\n\r\n{\"id\": \"half\", \"cust")
        seconds, answer = dropped(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"the body did not arrive within 0.3 s" in answer
    assert DEADLINE * 0.9 <= seconds < DEADLINE + 2, seconds
    db = Path(impatient.process.args[3])
    assert rows(db, "SELECT count(*) FROM events") == [(0,)]


def test_the_rest_of_a_body_the_server_did_not_wait_for_cannot_hold_the_connection(
        impatient):
    # /health answers at once; its body then comes a byte at a time, for ever
    with connect(impatient) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: shop\r\nContent-Length: 100000\r\n\r\n")
        seconds, answer = dropped(sock, sending=b"x" * 1000, every=DEADLINE / 10)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert seconds < DEADLINE + 2, seconds


def test_an_idle_kept_alive_connection_is_closed(impatient):
    with connect(impatient) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: shop\r\n\r\n")
        seconds, answer = dropped(sock)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"status":"ok"}'), answer
    assert DEADLINE * 0.9 <= seconds < DEADLINE + 2, seconds


def test_blank_lines_between_requests_do_not_keep_a_connection_alive(impatient):
    # a parser skips blank lines before a request line: each one is data all the same
    with connect(impatient) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: shop\r\n\r\n")
        seconds, answer = dropped(sock, sending=b"\n" * 1000, every=DEADLINE / 5)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert seconds < DEADLINE + 2, seconds


def test_a_connection_that_never_sends_a_byte_is_closed(impatient):
    with connect(impatient) as sock:
        seconds, _ = dropped(sock)
    assert DEADLINE * 0.9 <= seconds < DEADLINE + 2, seconds


def test_headers_over_max_header_are_431_and_closed(impatient):
    with connect(impatient) as sock:
        # a little over the limit, all read by the server: its answer is not lost to a reset
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: shop\r\nX-Big: " + b"b" * 9000)
        _, answer = dropped(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    assert b"over 8192 bytes" in answer


def test_headers_over_max_header_in_one_read_are_431_too(impatient):
    """Complete headers that arrive in one read are over the limit all the same."""
    with connect(impatient) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: shop\r\nX-Big: " + b"b" * 60_000
                     + b"\r\n\r\n")
        _, answer = dropped(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer


# 12. deliver --backoff 0 tries each decision once per run.

def test_deliver_with_no_backoff_tries_a_failing_decision_once_per_run(tmp_path):
    import json
    import sqlite3
    from contextlib import closing
    from datetime import UTC, datetime, timedelta

    from click.testing import CliRunner

    from retention.cli import cli

    from .servers import HttpReceiver

    rules = tmp_path / "rules.yaml"
    rules.write_text("capital: {initial: 70, opens_on: [purchase]}\n"
                     "rules:\n  complaint: {when: event.type == \"complaint\", points: -5,"
                     " then: [notify_team]}\n"
                     "actions:\n  notify_team: {kind: service, via: webhook}\n",
                     encoding="utf-8")
    db, events = tmp_path / "shop.db", tmp_path / "events.jsonl"
    at = datetime.now(UTC) - timedelta(hours=2)
    events.write_text("".join(json.dumps(e) + "\n" for e in (
        {"id": "p1", "customer": "c-1", "type": "purchase", "at": at.isoformat()},
        {"id": "c1", "customer": "c-1", "type": "complaint",
         "at": (at + timedelta(minutes=5)).isoformat()})), encoding="utf-8")
    runner = CliRunner()
    assert runner.invoke(cli, ["ingest", "--db", str(db), "--rules", str(rules),
                               str(events)]).exit_code == 0
    receiver = HttpReceiver().start()
    try:
        receiver.status = 500
        deliver = ["deliver", "--db", str(db), "--rules", str(rules), "--backoff", "0",
                   "--set", f"webhook.url={receiver.url}", "--set", "webhook.secret=s3cret"]
        first = runner.invoke(cli, deliver)
        assert first.exit_code == 2, first.output
        assert first.stdout.splitlines()[0] == "sent 0, failed 1"
        assert len(receiver.hits) == 1  # tried once, not until the breaker trips
        with closing(sqlite3.connect(db)) as conn:
            assert conn.execute("SELECT status, attempts FROM decisions").fetchall() == [
                ("failed", 1)]
        receiver.status = 200
        second = runner.invoke(cli, deliver)  # the next run tries it again
        assert second.exit_code == 0, second.output
        assert len(receiver.hits) == 2
    finally:
        receiver.stop()


# 13. One body cannot flood the dead letters (found in review).

def test_a_body_of_too_many_items_is_one_dead_letter_not_a_flood(tmp_path):
    """A 1 MB body of [0, 0, ...] was half a million dead letters; past max_events the
    body is refused whole, kept as one."""
    from retention.store import StoredEngine
    from tests.test_server import RETAIL, config_of, serving

    db = tmp_path / "shop.db"
    StoredEngine(db, RETAIL).close()
    with serving(create_app(config_of(db, max_events=100))) as server:
        flood = server.post("/events", [0] * 101)
        assert flood.status == 400, flood.body
        assert "more than 100" in flood.body["error"]
        assert server.post("/events", [0] * 100).status == 422  # each its own reason
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 101
