"""The webhook server as a host and its senders meet it: a real uvicorn on 127.0.0.1 in a
thread (or `retention serve` as a process), spoken to with http.client, and the database
read back with sqlite3 to see what was really stored.
"""

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import retention
from retention.delivery import Settings
from retention.plugins import pm
from retention.server import ServerConfig, create_app
from retention.signing import SignatureError
from retention.store import StoredEngine
from retention.webevents import Ignored

ROOT = Path(__file__).resolve().parent.parent
RETAIL = ROOT / "examples" / "rules" / "retail.yaml"
RETENTION = Path(sys.executable).parent / "retention"
SECRET = "a shared secret"


# -- a server on a real socket ------------------------------------------------------------

class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: Any  # the JSON the server answered, or its text when it is not JSON


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, chunks: list[bytes] | None = None
            ) -> Reply:
    """One request on its own connection; ``chunks`` sends the body chunked."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        if chunks is not None:
            conn.request(method, path, body=iter(chunks), encode_chunked=True,
                         headers={**(headers or {}), "Transfer-Encoding": "chunked"})
        else:
            conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        answer = {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = data.decode("utf-8", errors="replace")
    return Reply(response.status, answer, parsed)


class Running:
    """A server started by ``serving``: its port and app, and requests to it."""

    def __init__(self, port: int, app: Any):
        self.port = port
        self.app = app

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return request(self.port, "GET", path, headers=headers)

    def post(self, path: str, payload: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None,
             chunks: list[bytes] | None = None) -> Reply:
        body = raw if raw is not None or chunks is not None else json.dumps(payload).encode()
        return request(self.port, "POST", path, body=body, chunks=chunks,
                       headers={"Content-Type": "application/json", **(headers or {})})


@contextlib.contextmanager
def serving(app: Any):
    """``app`` under uvicorn in a thread, on a socket bound here (so the port is known
    before it starts); stopped, and its thread joined, whatever the test did."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "the server stopped while starting"
            assert time.monotonic() < deadline, "the server did not start within 10 s"
            time.sleep(0.01)
        yield Running(sock.getsockname()[1], app)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "the server did not stop within 10 s"


@pytest.fixture
def db(tmp_path):
    """A database with the bundled retail rules, as `retention init` leaves it."""
    path = tmp_path / "shop.db"
    StoredEngine(path, RETAIL).close()
    return path


def config_of(db: Path, settings: dict[str, str] | None = None, **options: Any
              ) -> ServerConfig:
    # the settings never come from this process's environment (RETENTION_STANDARD_SECRET)
    options.setdefault("deliver_every", 0)
    return ServerConfig(db=db, settings=Settings(settings or {}, environ={}), **options)


@pytest.fixture
def start(db):
    """``start(**config options)``: a server over ``db``; all stopped at the end."""
    with contextlib.ExitStack() as stack:
        def start(settings: dict[str, str] | None = None, **options: Any) -> Running:
            return stack.enter_context(serving(create_app(config_of(db, settings,
                                                                      **options))))
        yield start


@pytest.fixture
def server(start):
    return start()


def rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


def count(db: Path, table: str) -> int:
    return rows(db, f"SELECT count(*) FROM {table}")[0][0]


def everything(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table: to see that a refused request changed nothing."""
    with closing(sqlite3.connect(db)) as conn:
        tables = [t for (t,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}


def purchase(eid: str, customer: str = "ann", day: int = 1, **props: Any) -> dict[str, Any]:
    return {"id": eid, "customer": customer, "type": "purchase",
            "at": f"2026-03-{day:02d}T10:00:00Z", "amount": 30, **props}


def sign(key: bytes, body: bytes, msg_id: str = "msg_1", timestamp: int | None = None
         ) -> dict[str, str]:
    """Standard Webhooks headers, computed here rather than with retention.signing."""
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": msg_id, "webhook-timestamp": str(stamp),
            "webhook-signature": "v1," + base64.b64encode(digest).decode()}


# -- 1. canonical events --------------------------------------------------------------------

def test_one_event_or_an_array_is_stored_once_and_counted(server, db):
    one = server.post("/events", purchase("p1"))
    assert one.status == 200, one.body
    assert one.body == {"new": 1, "duplicates": 0, "identified": 0, "dead_lettered": 0,
                        "decisions": []}
    many = server.post("/events", [purchase("p2", day=2), purchase("p3", "bob", day=3)])
    assert many.status == 200, many.body
    assert (many.body["new"], many.body["duplicates"]) == (2, 0)
    assert rows(db, "SELECT id, customer FROM events ORDER BY id") == [
        ("p1", "ann"), ("p2", "ann"), ("p3", "bob")]
    before = everything(db)

    again = server.post("/events", [purchase("p1"), purchase("p2", day=2),
                                    purchase("p3", "bob", day=3)])
    assert again.status == 200, again.body
    assert (again.body["new"], again.body["duplicates"]) == (0, 3)
    assert everything(db) == before  # nothing new: not an event, not a ledger line
    assert count(db, "events") == 3


def test_the_purchase_that_earns_a_recognition_reward_carries_it_in_its_response(server, db):
    # retail.yaml: every fifth pack of diapers-x is 10% off, at the checkout
    four = server.post("/events", [purchase(f"d{n}", day=n, sku="diapers-x")
                                   for n in range(1, 5)])
    assert four.status == 200 and four.body["new"] == 4
    assert four.body["decisions"] == []
    fifth = server.post("/events", purchase("d5", day=5, sku="diapers-x"))
    assert fifth.status == 200, fifth.body
    [reward] = fifth.body["decisions"]
    assert (reward["rule"], reward["action"], reward["kind"], reward["trigger"]) == (
        "fifth_pack", "discount_now", "in_purchase", "d5")
    assert reward["params"]["percent"] == 10
    assert rows(db, "SELECT rule, trigger FROM decisions") == [("fifth_pack", "d5")]
    # the same purchase sent again is a duplicate: no second discount
    replay = server.post("/events", purchase("d5", day=5, sku="diapers-x"))
    assert (replay.body["new"], replay.body["duplicates"], replay.body["decisions"]) == (
        0, 1, [])
    assert count(db, "decisions") == 1


# -- 2. CloudEvents -------------------------------------------------------------------------

def cloudevent(eid: str, subject: str, **data: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": eid, "source": "/shop/eu", "type": "purchase",
            "time": "2026-03-01T10:00:00Z", "subject": subject,
            "datacontenttype": "application/json", "data": {"amount": 20, **data}}


def stored_event(db: Path, eid: str) -> tuple[Any, ...]:
    [row] = rows(db, "SELECT source, id, customer, type, at, props FROM events WHERE id = ?",
                 eid)
    return (*row[:5], json.loads(row[5]))


def test_a_structured_cloudevent_becomes_an_event(server, db):
    reply = server.post("/events", cloudevent("ce-1", "cleo", sku="soap"),
                        headers={"Content-Type": "application/cloudevents+json; charset=utf-8"})
    assert reply.status == 200, reply.body
    assert reply.body["new"] == 1
    assert stored_event(db, "ce-1") == ("/shop/eu", "ce-1", "cleo", "purchase",
                                        "2026-03-01T10:00:00+00:00",
                                        {"amount": 20, "sku": "soap"})


def test_a_cloudevents_batch_becomes_events(server, db):
    reply = server.post("/events", [cloudevent("ce-1", "cleo"), cloudevent("ce-2", "dina")],
                        headers={"Content-Type": "application/cloudevents-batch+json"})
    assert reply.status == 200, reply.body
    assert (reply.body["new"], reply.body["duplicates"]) == (2, 0)
    assert rows(db, "SELECT source, id, customer FROM events ORDER BY id") == [
        ("/shop/eu", "ce-1", "cleo"), ("/shop/eu", "ce-2", "dina")]


def test_a_binary_cloudevent_takes_its_attributes_from_the_headers(server, db):
    headers = {"ce-specversion": "1.0", "ce-id": "ce-9", "ce-source": "/shop/eu",
               "ce-type": "purchase", "ce-time": "2026-03-02T08:30:00+01:00",
               "ce-subject": "eve", "Content-Type": "application/json"}
    reply = server.post("/events", {"amount": 55, "sku": "tea"}, headers=headers)
    assert reply.status == 200, reply.body
    assert reply.body["new"] == 1
    assert stored_event(db, "ce-9") == ("/shop/eu", "ce-9", "eve", "purchase",
                                        "2026-03-02T08:30:00+01:00",
                                        {"amount": 55, "sku": "tea"})
    # the same id from the same source is the same event
    again = server.post("/events", {"amount": 55, "sku": "tea"}, headers=headers)
    assert (again.body["new"], again.body["duplicates"]) == (0, 1)


def test_binary_cloudevent_header_values_are_percent_decoded(server, db):
    # the HTTP binding percent-encodes space, '"', '%' and anything beyond ASCII; a
    # double-quoted value (older senders) is unquoted first
    headers = {"ce-specversion": "1.0", "ce-id": "ce-%C3%A9t%C3%A9", "ce-source": "/shop%20eu",
               "ce-type": '"purchase"', "ce-time": "2026-03-02T08:30:00Z",
               "ce-subject": "Jos%C3%A9 %22Pepe%22", "Content-Type": "application/json"}
    reply = server.post("/events", {"amount": 5}, headers=headers)
    assert reply.status == 200, reply.body
    assert rows(db, "SELECT source, id, customer, type FROM events") == [
        ("/shop eu", "ce-été", 'José "Pepe"', "purchase")]
    broken = server.post("/events", {"amount": 5}, headers={**headers, "ce-id": "x%C0%A0"})
    assert broken.status == 400, broken.body  # not UTF-8 once decoded: refused
    assert count(db, "events") == 1


# -- 3. signatures ------------------------------------------------------------------------

@pytest.fixture
def signed_server(start):
    return start({"standard.secret": SECRET})


def test_a_well_signed_request_is_accepted(signed_server, db):
    body = json.dumps(purchase("s1")).encode()
    reply = signed_server.post("/events", raw=body, headers=sign(SECRET.encode(), body))
    assert reply.status == 200, reply.body
    assert count(db, "events") == 1


@pytest.mark.parametrize("tamper", ["signature", "body", "missing", "unsigned", "garbage"])
def test_a_bad_signature_is_401_and_stores_nothing(signed_server, db, tamper):
    body = json.dumps([purchase("s1"), "not even an event"]).encode()
    headers = sign(SECRET.encode(), body)
    if tamper == "garbage":  # checked before parsing: no 400, no dead letter
        body = b'{"not json'
    elif tamper == "signature":
        headers = sign(b"another secret", body)
    elif tamper == "body":
        body = body.replace(b'"amount": 30', b'"amount": 3')
    elif tamper == "missing":
        del headers["webhook-signature"]
    else:
        headers = {}
    before = everything(db)
    reply = signed_server.post("/events", raw=body, headers=headers)
    assert reply.status == 401, reply.body
    assert everything(db) == before  # no event, and no dead letter either


@pytest.mark.parametrize("offset", [-360, 360])
def test_a_timestamp_six_minutes_away_is_refused(signed_server, db, offset):
    body = json.dumps(purchase("s1")).encode()
    stamp = int(time.time()) + offset
    reply = signed_server.post("/events", raw=body,
                               headers=sign(SECRET.encode(), body, timestamp=stamp))
    assert reply.status == 401, reply.body
    assert "minutes" in reply.body["error"]
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0
    # four minutes away either way is within the tolerance
    close = int(time.time()) + (240 if offset > 0 else -240)
    reply = signed_server.post("/events", raw=body,
                               headers=sign(SECRET.encode(), body, timestamp=close))
    assert reply.status == 200, reply.body



@pytest.mark.parametrize("stamp", ["+{}", "{:_}", "9" * 5000, "１２"],
                         ids=["plus", "underscores", "5000-digits", "fullwidth-digits"])
def test_a_timestamp_not_written_in_plain_digits_is_refused(signed_server, db, stamp):
    body = json.dumps(purchase("d1")).encode()
    headers = sign(SECRET.encode(), body)
    headers["webhook-timestamp"] = stamp.format(int(headers["webhook-timestamp"]))
    reply = signed_server.post("/events", raw=body, headers={
        k: v.encode().decode("latin-1") for k, v in headers.items()})
    assert (reply.status, reply.body) == (
        401, {"error": "webhook-timestamp is not a number of seconds"})
    assert count(db, "events") == 0

def test_a_whsec_secret_is_the_base64_of_the_key(start, db):
    key = os.urandom(24)
    server = start({"standard.secret": "whsec_" + base64.b64encode(key).decode()})
    body = json.dumps(purchase("w1")).encode()
    assert server.post("/events", raw=body, headers=sign(key, body)).status == 200
    # the text of the secret is not the key
    wrong = sign(("whsec_" + base64.b64encode(key).decode()).encode(), body)
    assert server.post("/events", raw=body, headers=wrong).status == 401
    assert count(db, "events") == 1


def test_the_standard_webhooks_example_verifies(start, db):
    # the published example of the Standard Webhooks specification
    server = start({"standard.secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"},
                   clock=lambda: 1614265330.0)
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
               "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}
    reply = server.post("/events", raw=b'{"test": 2432232314}', headers=headers)
    # past the signature: the body is no event, so it is dead-lettered (not 401)
    assert reply.status == 422, reply.body
    assert "missing field 'id'" in reply.body["errors"][0]
    assert count(db, "dead_letters") == 1


def test_one_valid_signature_among_several_is_enough(signed_server, db):
    body = json.dumps(purchase("r1")).encode()
    good = sign(SECRET.encode(), body)
    old = sign(b"the previous secret", body)["webhook-signature"]
    rotated = {**good, "webhook-signature": f"{old} {good['webhook-signature']} v1,AAAA"}
    assert signed_server.post("/events", raw=body, headers=rotated).status == 200
    only_bad = {**good, "webhook-signature": f"{old} v1,AAAA"}
    assert signed_server.post("/events", raw=body, headers=only_bad).status == 401
    assert count(db, "events") == 1


# -- 4. body size -----------------------------------------------------------------------

def padded(eid: str, size: int) -> bytes:
    """A valid event whose JSON is exactly ``size`` bytes (padded with whitespace: no
    event value may be that long)."""
    bare = json.dumps(purchase(eid)).encode()
    body = bare[:-1] + b" " * (size - len(bare)) + b"}"
    assert len(body) == size
    return body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_max_body_is_413_and_stores_nothing(start, db, chunked):
    server = start(max_body=1000)
    big = padded("big", 1500)

    def send(body: bytes) -> Reply:
        if chunked:
            return server.post("/events", chunks=[body[i:i + 300]
                                                  for i in range(0, len(body), 300)])
        return server.post("/events", raw=body)

    before = everything(db)
    reply = send(big)
    assert reply.status == 413, reply.body
    assert everything(db) == before
    # exactly max_body bytes is still accepted, chunked or not
    exact = send(padded("exact", 1000))
    assert exact.status == 200, exact.body
    assert rows(db, "SELECT id FROM events") == [("exact",)]


def test_the_default_limit_is_one_mebibyte(server, db):
    assert server.post("/events", raw=padded("limit", 1 << 20)).status == 200
    over = server.post("/events", raw=padded("over", (1 << 20) + 1))
    assert over.status == 413, over.body
    assert rows(db, "SELECT id FROM events") == [("limit",)]



def test_a_body_slower_than_body_timeout_is_408_whatever_server_runs_the_app(start, db):
    # the app's own deadline: it holds under any ASGI server (here, plain uvicorn)
    server = start(body_timeout=0.3)
    body = json.dumps(purchase("slow")).encode()

    def trickle() -> Any:
        yield body[:10]
        time.sleep(0.6)
        yield body[10:]

    started = time.monotonic()
    try:
        reply = server.post("/events", chunks=trickle())
    except (ConnectionResetError, BrokenPipeError):
        reply = None  # closed while the client still sent: also dropped
    assert time.monotonic() - started < 3
    if reply is not None:
        assert reply.status == 408, reply.body
        assert reply.body == {"error": "the body did not arrive within 0.3 s"}
        assert reply.headers["connection"] == "close"
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0
    assert server.post("/events", raw=body).status == 200  # in time, it is taken

# -- 5. bodies that are not events ----------------------------------------------------------

@pytest.mark.parametrize("body", [b'{"id": "x1", "customer": "ann", ',
                                  b"[" * 50_000 + b"]" * 50_000],
                         ids=["truncated", "nested-too-deeply"])
def test_invalid_json_is_400_and_kept_as_a_dead_letter(server, db, body):
    reply = server.post("/events", raw=body)
    assert reply.status == 400, reply.body
    assert reply.body["error"].startswith("invalid JSON: ")
    assert reply.body["dead_lettered"] == 1
    assert rows(db, "SELECT origin, reason, raw FROM dead_letters") == [
        ("POST /events", reply.body["error"], body.decode())]
    assert count(db, "events") == 0


def test_a_body_that_is_not_utf8_is_400_and_kept(server, db):
    reply = server.post("/events", raw=b'{"id": "\xff\xfe"}')
    assert reply.status == 400, reply.body
    assert "UTF-8" in reply.body["error"]
    [(reason, raw, retriable)] = rows(db, "SELECT reason, raw, retriable FROM dead_letters")
    assert reason == reply.body["error"] and retriable == 0
    assert raw.startswith('{"id": "')


def test_an_event_without_customer_is_422_and_the_others_are_stored(server, db):
    lacking = {"id": "bad", "type": "purchase", "at": "2026-03-01T11:00:00Z"}
    reply = server.post("/events", [purchase("ok1"), lacking, purchase("ok2", day=2)])
    assert reply.status == 422, reply.body
    assert (reply.body["new"], reply.body["dead_lettered"]) == (2, 1)
    [reason] = reply.body["errors"]
    assert "missing field 'customer'" in reason
    assert rows(db, "SELECT id FROM events ORDER BY id") == [("ok1",), ("ok2",)]
    [(origin, line, stored_reason, raw)] = rows(
        db, "SELECT origin, line, reason, raw FROM dead_letters")
    assert (origin, line, stored_reason) == ("POST /events", 2, reason)
    assert json.loads(raw) == lacking


# -- 6. event sources -------------------------------------------------------------------------

ACME_KEY = "acme-signing-key"


class AcmeSource:
    """A host's own webhook: an HMAC of the body in X-Acme-Signature, orders inside."""

    def __init__(self, settings: Settings):
        self.key = settings.require("acme", "key").encode()

    def verify(self, body: bytes, headers: dict[str, str]) -> None:
        expected = hmac.new(self.key, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(headers.get("x-acme-signature", ""), expected):
            raise SignatureError("bad X-Acme-Signature")

    def parse(self, body: bytes, headers: dict[str, str]) -> list[Any]:
        payload = json.loads(body)
        if payload.get("ping"):  # the host checking the endpoint: nothing to store
            return [Ignored("a ping")]
        return [Ignored(f"topic {t}") for t in payload.get("other_topics", [])] + [
                {"id": order["ref"], "customer": payload["shopper"]["email"],
                 "type": "purchase", "at": order["placed"], "amount": order["total"]}
                for order in payload["orders"]]


class AcmePlugin:
    @retention.hookimpl
    def register_sources(self, register: Any) -> None:
        register("acme", AcmeSource)


@pytest.fixture
def acme():
    plugin = AcmePlugin()
    pm.register(plugin, name="acme")
    try:
        yield plugin
    finally:
        pm.unregister(plugin)


def acme_signed(body: bytes) -> dict[str, str]:
    return {"X-Acme-Signature": hmac.new(ACME_KEY.encode(), body,
                                         hashlib.sha256).hexdigest()}


def test_an_unknown_source_is_404(server, db):
    reply = server.post("/hooks/nobody", purchase("u1"))
    assert reply.status == 404, reply.body
    assert "nobody" in reply.body["error"]
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0


def test_a_plugin_source_checks_its_signature_and_parses_its_payload(acme, start, db):
    server = start({"acme.key": ACME_KEY})
    body = json.dumps({"shopper": {"email": "fay@example.com"}, "orders": [
        {"ref": "A-1", "placed": "2026-03-01T09:00:00Z", "total": 12.5},
        {"ref": "A-2", "placed": "2026-03-02T09:00:00Z", "total": 80}]}).encode()
    forged = server.post("/hooks/acme", raw=body, headers={"X-Acme-Signature": "00" * 32})
    assert forged.status == 401, forged.body
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0

    reply = server.post("/hooks/acme", raw=body, headers=acme_signed(body))
    assert reply.status == 200, reply.body
    assert (reply.body["new"], reply.body["duplicates"]) == (2, 0)
    assert rows(db, "SELECT source, id, customer FROM events ORDER BY id") == [
        ("acme", "A-1", "fay@example.com"), ("acme", "A-2", "fay@example.com")]
    again = server.post("/hooks/acme", raw=body, headers=acme_signed(body))
    assert (again.body["new"], again.body["duplicates"]) == (0, 2)

    # signed, but not what the source expects: 400, kept with the reason
    odd = b'{"shopper": {}}'
    kept = server.post("/hooks/acme", raw=odd, headers=acme_signed(odd))
    assert kept.status == 400, kept.body
    assert rows(db, "SELECT origin, raw FROM dead_letters") == [
        ("POST /hooks/acme", odd.decode())]
    assert "KeyError" in rows(db, "SELECT reason FROM dead_letters")[0][0]


def test_what_a_source_ignores_is_counted_stored_nowhere_and_answered_200(acme, start, db):
    server = start({"acme.key": ACME_KEY})
    ping = b'{"ping": true}'
    reply = server.post("/hooks/acme", raw=ping, headers=acme_signed(ping))
    assert (reply.status, reply.body["ignored"], reply.body["new"]) == (200, 1, 0)
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0
    # ignored beside events: the events are stored, the rest counted
    body = json.dumps({"shopper": {"email": "fay@example.com"}, "other_topics": ["a", "b"],
                       "orders": [{"ref": "A-1", "placed": "2026-03-01T09:00:00Z",
                                   "total": 1}]}).encode()
    reply = server.post("/hooks/acme", raw=body, headers=acme_signed(body))
    assert (reply.status, reply.body["ignored"], reply.body["new"]) == (200, 2, 1)
    assert count(db, "events") == 1
    # a forged ping is still refused
    assert server.post("/hooks/acme", raw=ping, headers={"X-Acme-Signature": "0"}).status == 401


def test_a_head_request_says_whether_a_source_is_there(acme, start, db):
    server = start({"acme.key": ACME_KEY}, token="t0ken")
    token = {"Authorization": "Bearer t0ken"}
    assert request(server.port, "HEAD", "/hooks/acme", headers=token).status == 200
    assert request(server.port, "HEAD", "/hooks/nobody", headers=token).status == 404
    assert request(server.port, "HEAD", "/hooks/acme").status == 401
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0


def test_the_standard_source_takes_signed_events(start, db):
    server = start({"standard.secret": SECRET})
    body = json.dumps([purchase("h1"), cloudevent("h2", "gus")]).encode()
    reply = server.post("/hooks/standard", raw=body, headers=sign(SECRET.encode(), body))
    assert reply.status == 200, reply.body
    assert reply.body["new"] == 2
    assert rows(db, "SELECT source, id FROM events ORDER BY id") == [
        ("standard", "h1"), ("/shop/eu", "h2")]  # a CloudEvent keeps its own source
    forged = server.post("/hooks/standard", raw=body, headers=sign(b"guess", body))
    assert forged.status == 401
    assert count(db, "events") == 2


def test_a_source_without_its_setting_is_503(start, db):
    server = start()  # no standard.secret
    reply = server.post("/hooks/standard", purchase("n1"))
    assert reply.status == 503, reply.body
    assert "RETENTION_STANDARD_SECRET" in reply.body["error"]
    assert count(db, "events") == 0


# -- 7. bearer token ------------------------------------------------------------------------

@pytest.mark.parametrize("given", [None, "Bearer wrong", "Bearer t0ken-but-longer",
                                   "Basic t0ken", "t0ken"])
def test_every_endpoint_but_health_wants_the_token(start, db, given):
    server = start({"standard.secret": SECRET}, token="t0ken")
    headers = {} if given is None else {"Authorization": given}
    for path in ("/events", "/hooks/standard", "/hooks/nobody"):
        reply = server.post(path, purchase("t1"), headers=headers)
        assert reply.status == 401, (path, reply.body)
        assert reply.headers.get("www-authenticate") == "Bearer"
    assert server.get("/customers/ann", headers=headers).status == 401
    assert count(db, "events") == 0 and count(db, "dead_letters") == 0
    health = server.get("/health", headers=headers)
    assert (health.status, health.body) == (200, {"status": "ok"})
    # with the token, the same requests get through
    body = json.dumps(purchase("t1")).encode()
    token = {"Authorization": "Bearer t0ken"}
    assert server.post("/events", raw=body,
                       headers={**token, **sign(SECRET.encode(), body)}).status == 200
    assert server.get("/customers/ann", headers=token).status == 200


# -- 8. customers ---------------------------------------------------------------------------

def test_a_customer_page_gets_capital_level_and_the_explained_ledger(server):
    events = [purchase("c1", "dan"),
              {"id": "c2", "customer": "dan", "type": "complaint", "at": "2026-03-02T10:00:00Z"},
              {"id": "c3", "customer": "dan", "type": "complaint", "at": "2026-03-03T10:00:00Z"}]
    assert server.post("/events", events).status == 200
    reply = server.get("/customers/dan?at=2026-03-04T00:00:00Z")
    assert reply.status == 200, reply.body
    info = reply.body
    assert (info["customer"], info["capital"], info["level"]) == ("dan", 48.0, "watch")
    assert [(e["rule"], e["points"], e["event_id"]) for e in info["ledger"]] == [
        ("opening", 70.0, "c1"), ("satisfied_purchase", 2.0, "c1"),
        ("complaint", -12.0, "c2"), ("complaint", -12.0, "c3")]
    assert all(e["reason"] for e in info["ledger"])
    assert "complaint: -12 points" in info["ledger"][2]["reason"]
    earlier = server.get("/customers/dan?at=2026-03-02T12:00:00Z").body
    assert earlier["capital"] == 60.0 and len(earlier["ledger"]) == 3
    # before the second complaint fired watch, dan was in no level
    assert earlier["level"] is None and info["level"] == "watch"
    now = server.get("/customers/dan").body  # at the server's clock: silence has drained it
    assert now["capital"] < 48.0
    # what time did since (silence) is in the ledger, not settled: it adds up
    assert sum(e["points"] for e in now["ledger"]) == pytest.approx(now["capital"], abs=1e-6)
    assert "silence" in [e["rule"] for e in now["ledger"] if not e["settled"]]


def test_an_unknown_customer_is_404_and_a_bad_time_400(server):
    assert server.post("/events", purchase("k1", "kim")).status == 200
    unknown = server.get("/customers/nobody")
    assert unknown.status == 404, unknown.body
    assert "nobody" in unknown.body["error"]
    bad = server.get("/customers/kim?at=yesterday")
    assert bad.status == 400, bad.body


def test_an_alias_from_an_identify_event_finds_the_customer(server):
    identify = {"type": "identify", "customer": "liv", "aliases": ["liv@example.com"]}
    reply = server.post("/events", [purchase("l1", "liv"), identify])
    assert reply.status == 200, reply.body
    assert (reply.body["new"], reply.body["identified"]) == (1, 1)
    found = server.get("/customers/" + quote("liv@example.com") + "?at=2026-03-02T00:00:00Z")
    assert found.status == 200, found.body
    assert found.body["customer"] == "liv"
    assert found.body["aliases"] == ["liv@example.com"]
    assert found.body["capital"] == 72.0


def test_a_customer_id_with_slashes_is_found(server):
    gid = "gid://shop/Customer/7"
    assert server.post("/events", purchase("g1", gid)).status == 200
    reply = server.get("/customers/" + quote(gid, safe="") + "?at=2026-03-02T00:00:00Z")
    assert reply.status == 200, reply.body
    assert reply.body["customer"] == gid


# -- 9. concurrency: group commits -------------------------------------------------------------

def hold_first_commit(server: Running, clients: int, monkeypatch: Any) -> list[int]:
    """Hold the server's first transaction until ``clients`` requests wait in its queue,
    so the others are committed together; returns the sizes of the groups committed."""
    service = server.app.state.retention
    assert server.get("/health").status == 200  # the writer and its queue exist now
    groups: list[int] = []
    queued = 0
    all_queued = threading.Event()
    queue = service._queue
    put = queue.put_nowait

    def put_nowait(item: Any) -> None:  # runs in the server's event loop
        nonlocal queued
        put(item)
        queued += 1
        if queued == clients:
            all_queued.set()

    commit = service._commit

    def slow_first_commit(group: list[Any]) -> Any:  # runs in the writer thread
        if not groups:  # hold the first transaction until every request waits
            assert all_queued.wait(10), "the requests did not all arrive"
        groups.append(len(group))
        return commit(group)

    monkeypatch.setattr(queue, "put_nowait", put_nowait)
    monkeypatch.setattr(service, "_commit", slow_first_commit)
    return groups


def test_concurrent_requests_are_committed_together_with_their_own_counts(server, db,
                                                                          monkeypatch):
    clients = 20
    groups = hold_first_commit(server, clients, monkeypatch)
    barrier = threading.Barrier(clients)
    replies: dict[int, Reply] = {}

    def client(n: int) -> None:
        events = [purchase(f"own-{n}-a", f"cust-{n}"), purchase(f"own-{n}-b", f"cust-{n}", 2),
                  purchase("shared", "everyone", 3)]
        barrier.wait(10)
        replies[n] = server.post("/events", events)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(replies) == clients
    assert all(r.status == 200 for r in replies.values()), replies
    # those that came while the first transaction was held went in one more
    assert len(groups) <= 2 and sum(groups) == clients, groups
    for r in replies.values():
        assert r.body["new"] + r.body["duplicates"] == 3
        assert r.body["new"] >= 2  # its own two events are new to it
    assert sum(r.body["new"] for r in replies.values()) == 2 * clients + 1
    assert sum(r.body["duplicates"] for r in replies.values()) == clients - 1
    assert count(db, "events") == 2 * clients + 1
    assert rows(db, "SELECT count(*) FROM events WHERE id = 'shared'") == [(1,)]


def test_a_failed_transaction_fails_every_request_in_it_and_stores_nothing(server, db):
    with closing(sqlite3.connect(db)) as conn, conn:  # the disk refuses every event
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON events "
                     "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END")
    before = everything(db)
    lacking = {"id": "bad", "type": "purchase", "at": "2026-03-01T11:00:00Z"}
    reply = server.post("/events", [purchase("f1"), lacking])
    assert reply.status == 503, reply.body
    assert "disk on fire" in reply.body["error"]
    assert everything(db) == before  # not even the dead letter
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DROP TRIGGER refuse")
    # the same events afterwards are new: the failed attempt left nothing behind
    after = server.post("/events", [purchase("f1"), lacking])
    assert after.status == 422, after.body
    assert (after.body["new"], after.body["duplicates"], after.body["dead_lettered"]) == (
        1, 0, 1)
    assert count(db, "events") == 1 and count(db, "dead_letters") == 1


def test_stopping_the_server_closes_the_database(db):
    with serving(create_app(config_of(db))) as server:
        assert server.post("/events", purchase("z1")).status == 200
        assert Path(f"{db}-wal").exists()  # WAL mode, a connection open
    # SQLite removes the WAL file when its last connection closes
    assert not Path(f"{db}-wal").exists()
    assert count(db, "events") == 1


# -- 10. mounted in a host's app ----------------------------------------------------------

def test_mounted_in_a_host_app_it_starts_itself(db):
    inner = create_app(config_of(db))
    service = inner.state.retention
    lifespans = []

    @contextlib.asynccontextmanager
    async def host_lifespan(app: Any) -> Any:
        lifespans.append("started")
        yield
        await service.stop()  # what a host does on its way down

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the host's own page")

    host = Starlette(routes=[Route("/", home), Mount("/retention", app=inner)],
                     lifespan=host_lifespan)
    with serving(host) as server:
        assert lifespans == ["started"]
        assert service._store is None  # the host's lifespan did not start it
        # the first requests come at once: the service starts once, and all get in
        barrier = threading.Barrier(8)
        replies: list[Reply] = []

        def first(n: int) -> None:
            barrier.wait(10)
            replies.append(server.post("/retention/events", purchase(f"m{n}", "mo", n + 1)))

        threads = [threading.Thread(target=first, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert [(r.status, r.body["new"]) for r in replies] == [(200, 1)] * 8, replies
        assert len(service._tasks) == 1  # one writer loop (deliver_every=0: no delivery)
        assert server.get("/retention/health").body == {"status": "ok"}
        page = server.get("/retention/customers/mo?at=2026-03-01T12:00:00Z")
        assert (page.status, page.body["capital"]) == (200, 72.0)
        assert server.get("/").body == "the host's own page"
        assert server.get("/events").status == 404  # only under the mount
    assert rows(db, "SELECT count(DISTINCT id), min(customer) FROM events") == [(8, "mo")]
    assert not Path(f"{db}-wal").exists()  # the host's lifespan stopped it


# -- 11. retention serve --------------------------------------------------------------------

def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_retention_serve_runs_the_server_and_stops_cleanly(tmp_path, stop):
    db = tmp_path / "served.db"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETENTION_")}
    process = subprocess.Popen(
        [str(RETENTION), "serve", "--db", str(db), "--rules", str(RETAIL),
         "--port", str(port), "--token", "tok"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "retention serve did not answer in 20 s"
            try:
                health = request(port, "GET", "/health")
                break
            except OSError:
                time.sleep(0.05)
        assert (health.status, health.body) == (200, {"status": "ok"})
        body = json.dumps(purchase("sv1", "sal")).encode()
        assert request(port, "POST", "/events", body=body).status == 401
        reply = request(port, "POST", "/events", body=body,
                        headers={"Authorization": "Bearer tok",
                                 "Content-Type": "application/json"})
        assert reply.status == 200, reply.body
        assert reply.body["new"] == 1
        process.send_signal(stop)
        _, err = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # uvicorn shuts down, then raises SIGTERM again to end as a process killed by it
    assert process.returncode in ((0, -signal.SIGTERM) if stop == signal.SIGTERM else (0,)), err
    assert "Traceback" not in err, err
    assert "no --secret" in err  # it says unsigned events are accepted
    assert rows(db, "SELECT id, customer FROM events") == [("sv1", "sal")]
    assert not Path(f"{db}-wal").exists()  # its connections were closed



@pytest.mark.parametrize("quiet", [False, True], ids=["access log", "--quiet"])
def test_retention_serve_says_where_it_listens_and_logs_each_request(tmp_path, quiet):
    from tests.servers import retention_serve

    served = retention_serve(tmp_path / "served.db", RETAIL, *(["--quiet"] if quiet else []))
    try:
        assert request(served.port, "GET", "/health").status == 200
        body = json.dumps(purchase("lg1")).encode()
        reply = request(served.port, "POST", "/events?from=test", body=body,
                        headers={"Content-Type": "application/json"})
        assert reply.status == 200, reply.body
    finally:
        status = served.stop()
    assert status in (0, -signal.SIGTERM), served.err
    assert f"retention: listening on http://127.0.0.1:{served.port}" in served.err
    assert not any("Uvicorn running" in line or "Traceback" in line for line in served.err)
    access = [line for line in served.out if "HTTP/1.1" in line]
    if quiet:
        assert access == [], served.out
    else:
        assert len(access) == 2, served.out
        assert '"GET /health HTTP/1.1" 200' in access[0]
        assert '"POST /events?from=test HTTP/1.1" 200' in access[1]
        assert access[0].split()[1].startswith("127.0.0.1:")  # who asked

# -- 12. the delivery loop inside the server ------------------------------------------------

def test_the_server_delivers_the_decisions_its_events_made(start, db, tmp_path):
    log = tmp_path / "deliveries.jsonl"
    server = start({"log.path": str(log)}, deliver_every=30.0,
                   routes={"crm_tag": "log", "crm_task": "log"},
                   max_age=3650 * 86400.0)  # (the events are of March 2026)
    # retail.yaml: ten purchases within a year grant the loyalty card (via crm_tag)
    answer = server.post("/events", [purchase(f"p{n}", day=n) for n in range(1, 11)])
    assert answer.status == 200, answer.body
    [card] = [d for d in answer.body["decisions"] if d["action"] == "grant_card"]
    # new decisions wake the loop at once: no waiting for the 30 s period
    deadline = time.monotonic() + 10
    while not (log.exists() and card["id"] in log.read_text()):
        assert time.monotonic() < deadline, "the decision was not delivered within 10 s"
        time.sleep(0.02)
    delivered = [json.loads(line) for line in log.read_text().splitlines()]
    assert [d["data"]["id"] for d in delivered] == [card["id"]]
    deadline = time.monotonic() + 10
    while rows(db, "SELECT status FROM decisions WHERE id = ?", card["id"]) != [("sent",)]:
        assert time.monotonic() < deadline, "the decision was not marked sent"
        time.sleep(0.02)


def test_a_request_that_breaks_its_group_commit_fails_alone(server, db, monkeypatch):
    clients = 6
    service = server.app.state.retention
    groups = hold_first_commit(server, clients, monkeypatch)
    store = service._store
    ingest = store.ingest_batch

    def ingest_batch(items: Any, **options: Any) -> Any:  # a bug some input triggers
        if any(isinstance(i.raw, dict) and i.raw.get("id") == "poison" for i in items):
            raise RuntimeError("a bug")
        return ingest(items, **options)

    monkeypatch.setattr(store, "ingest_batch", ingest_batch)
    barrier = threading.Barrier(clients)
    replies: dict[int, Reply] = {}

    def client(n: int) -> None:
        barrier.wait(10)
        replies[n] = server.post("/events", purchase("poison" if n == 0 else f"ok-{n}"))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert replies[0].status == 500 and replies[0].body == {"error": "not stored: RuntimeError"}
    assert all(replies[n].status == 200 and replies[n].body["new"] == 1
               for n in range(1, clients)), replies
    assert max(groups) > 1  # they were grouped, and the group was split to find the culprit
    assert sorted(i for (i,) in rows(db, "SELECT id FROM events")) == [
        f"ok-{n}" for n in range(1, clients)]


def test_a_lone_surrogate_is_400_and_kept(server, db):
    body = b'{"id": "s1", "customer": "\\ud800", "type": "purchase", "at": "2026-03-01T10:00:00Z"}'
    reply = server.post("/events", raw=body)
    assert reply.status == 400, reply.body
    assert "lone UTF-16 surrogate" in reply.body["error"]
    assert count(db, "events") == 0
    assert rows(db, "SELECT raw FROM dead_letters") == [(body.decode(),)]


def test_a_signed_message_is_used_once_so_its_unsigned_headers_cannot_be_replayed(
        signed_server, db):
    body = json.dumps({"amount": 55}).encode()
    headers = {"ce-specversion": "1.0", "ce-id": "ce-1", "ce-source": "/shop",
               "ce-type": "purchase", "ce-time": "2026-03-02T08:30:00Z", "ce-subject": "ann",
               "Content-Type": "application/json", **sign(SECRET.encode(), body, "msg_ce1")}
    first = signed_server.post("/events", raw=body, headers=headers)
    assert first.status == 200 and first.body["new"] == 1, first.body
    before = everything(db)
    # the captured request again, its ce-* headers (outside the signature) changed
    forged = {**headers, "ce-id": "forged-1", "ce-subject": "bob", "ce-type": "complaint"}
    again = signed_server.post("/events", raw=body, headers=forged)
    assert again.status == 200 and again.body["replayed"] is True, again.body
    assert again.body["new"] == 0
    assert everything(db) == before


def test_a_signed_message_that_was_not_stored_can_be_sent_again(signed_server, db):
    body = json.dumps(purchase("r1")).encode()
    headers = sign(SECRET.encode(), body, "msg_r1")
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON events "
                     "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    assert signed_server.post("/events", raw=body, headers=headers).status == 503
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DROP TRIGGER refuse")
    retried = signed_server.post("/events", raw=body, headers=headers)  # the sender's retry
    assert retried.status == 200 and retried.body["new"] == 1, retried.body
