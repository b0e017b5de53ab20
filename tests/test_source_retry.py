"""A webhook body its event source cannot use yet (webevents.Unavailable: the host's API
did not answer a lookup) is kept as a dead letter naming the source, answered 503,
and handed back to the source by a retry (StoredEngine.retry_dead_letters(resend=),
`retention dead-letters --retry --set ...`)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import retention
from retention.cli import cli
from retention.plugins import pm
from retention.store import StoredEngine
from retention.webevents import BodyError, Unavailable

from . import test_server
from .test_server import RETAIL, count, rows

# the server's fixtures: a database with the retail rules, and servers over it
db = test_server.db
start = test_server.start


class Lookups:
    """A host whose API is down or up; what the source was given on each call."""

    def __init__(self) -> None:
        self.up = False
        self.refuse = False
        self.seen: list[tuple[bytes, dict[str, str]]] = []


class LookupSource:
    """Looks the order's customer up on its host (here: ``Lookups``)."""

    lookups: Lookups

    def __init__(self, settings):
        self.token = settings.require("lookup", "token")

    def verify(self, body, headers):
        pass

    def parse(self, body, headers):
        self.lookups.seen.append((body, dict(headers)))
        if self.lookups.refuse:
            raise BodyError("lookup: not an order")
        order = json.loads(body)
        if not self.lookups.up:
            raise Unavailable(f"lookup: order {order['order']}: the host did not answer")
        return [retention.webevents.Ignored("a ping"),
                {"id": f"order:{order['order']}", "customer": "ann", "type": "purchase",
                 "at": "2026-03-01T10:00:00Z", "amount": 30}]


class LookupPlugin:
    @retention.hookimpl
    def register_sources(self, register):
        register("lookup", LookupSource)


@pytest.fixture
def lookups():
    state = Lookups()
    LookupSource.lookups = state
    plugin = LookupPlugin()
    pm.register(plugin)
    try:
        yield state
    finally:
        pm.unregister(plugin)


BODY = b'{"order": 7}'
#: the dead letters, each with the source a retry hands it back to (resend_to)
LETTERS = ("dead_letters LEFT JOIN (SELECT seq, source AS resend_to FROM"
           " dead_letter_sources) USING (seq)")


def test_an_unavailable_lookup_is_503_and_a_dead_letter_naming_the_source(start, db,
                                                                          lookups):
    server = start({"lookup.token": "t"})
    reply = server.post("/hooks/lookup", raw=BODY)
    assert reply.status == 503, reply.body
    assert reply.body == {"error": "lookup: order 7: the host did not answer",
                          "dead_lettered": 1}
    assert rows(db, "SELECT origin, raw, retriable, resend_to FROM " + LETTERS) == [
        ("POST /hooks/lookup", BODY.decode(), 1, "lookup")]
    assert count(db, "events") == 0


def test_a_retry_hands_the_body_back_to_its_source(start, db, lookups):
    server = start({"lookup.token": "t"})
    assert server.post("/hooks/lookup", raw=BODY).status == 503
    engine = StoredEngine(db, RETAIL)
    try:
        # without a way to reach the source, the letter waits
        report = engine.retry_dead_letters()
        assert (report.ingested, report.dead_lettered) == (0, 1)
        sources = {"lookup": LookupSource}

        def resend(name, text):
            return sources[name](retention.delivery.Settings({"lookup.token": "t"},
                                                             environ={})).parse(
                text.encode(), {})

        # still down: kept, retriable, with the reason it has now
        report = engine.retry_dead_letters(resend=resend)
        assert (report.ingested, report.dead_lettered) == (0, 1)
        assert engine.dead_letters()[0]["resend_to"] == "lookup"
        lookups.up = True
        report = engine.retry_dead_letters(resend=resend)
        assert (report.ingested, report.dead_lettered) == (1, 0)
        assert engine.dead_letters() == []
    finally:
        engine.close()
    # the body alone, as it came, and no headers
    assert lookups.seen[-1] == (BODY, {})
    assert rows(db, "SELECT source, id, customer FROM events") == [
        ("lookup", "order:7", "ann")]


def test_retention_dead_letters_retry_builds_the_source_with_its_settings(start, db,
                                                                         lookups,
                                                                         monkeypatch):
    monkeypatch.delenv("RETENTION_LOOKUP_TOKEN", raising=False)
    server = start({"lookup.token": "t"})
    assert server.post("/hooks/lookup", raw=BODY).status == 503
    lookups.up = True
    # the source cannot start without its setting: the letter stays, retriable
    result = CliRunner().invoke(cli, ["dead-letters", "--db", str(db), "--retry"])
    assert result.exit_code == 2, result.output
    assert rows(db, "SELECT retriable, resend_to FROM " + LETTERS) == [(1, "lookup")]
    assert "RETENTION_LOOKUP_TOKEN" in rows(db, "SELECT reason FROM dead_letters")[0][0]
    result = CliRunner().invoke(cli, ["dead-letters", "--db", str(db), "--retry",
                                      "--set", "lookup.token=t"])
    assert result.exit_code == 0, result.output
    assert "ingested 1" in result.output
    assert (count(db, "dead_letters"), count(db, "events")) == (0, 1)


def test_a_body_the_source_now_refuses_stays_as_a_letter_no_retry_can_use(start, db,
                                                                         lookups):
    server = start({"lookup.token": "t"})
    assert server.post("/hooks/lookup", raw=BODY).status == 503
    lookups.refuse = True
    result = CliRunner().invoke(cli, ["dead-letters", "--db", str(db), "--retry",
                                      "--set", "lookup.token=t"])
    assert result.exit_code == 2, result.output
    assert rows(db, "SELECT reason, retriable, resend_to FROM " + LETTERS) == [
        ("lookup: not an order", 0, None)]


def test_a_plain_body_error_is_still_400_and_not_retried(start, db, lookups):
    lookups.refuse = True
    server = start({"lookup.token": "t"})
    reply = server.post("/hooks/lookup", raw=BODY)
    assert reply.status == 400
    assert rows(db, "SELECT retriable, resend_to FROM " + LETTERS) == [(0, None)]
