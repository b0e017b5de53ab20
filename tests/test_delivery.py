"""`retention deliver` against real servers on loopback: an SMTP server (aiosmtpd, with
STARTTLS and login), an HTTP server taking signed webhooks, a log file; a server
stopped mid-run, a process killed mid-delivery, an operator's retry, an erasure
after a failed delivery. Each test reads what arrived and what the outbox says.

Time is a clock handed to the Deliverer, never a sleep: backoff and leases are
passed by moving it.
"""

import base64
import email.utils
import hashlib
import hmac
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from retention import Engine, plugins
from retention.cli import cli
from retention.delivery import BREAKER, LEASE, Deliverer, DeliveryReport, Settings
from retention.plugins.email import EmailSink
from retention.signing import SignatureError, verify

from .servers import (
    HttpReceiver,
    SmtpServer,
    authenticator,
    self_signed_certificate,
    server_tls_context,
)

RETENTION = os.path.join(os.path.dirname(sys.executable), "retention")
SENDER = "Shop <news@shop.example>"
UNSUBSCRIBE = "https://shop.example/u/${customer}"
SECRET = "whsec_" + base64.b64encode(b"a webhook key of 32 bytes, fixed").decode()

RULES = """\
capital: {initial: 70, min: 0, max: 100, opens_on: [purchase]}
rules:
  review_written:
    when: event.type == "review"
    points: 4
    category: contribution
    then: [{thank_contributor: {coupon: THANKS10}}]
  billing_error:
    when: event.type == "billing_error"
    points: -10
    then: [billing_apology]
  complaint:
    when: event.type == "complaint"
    points: -5
    then: [call_customer, flag_in_crm]
  cancellation_page:
    when: event.type == "page_view" and event.page == "cancel"
    points: -8
    category: pull
    then: [notify_team]
actions:
  thank_contributor: {kind: marketing, via: email, template: thanks}
  billing_apology:   {kind: service, via: email, template: billing}
  call_customer:     {kind: service, via: crm_task}
  flag_in_crm:       {kind: service, via: crm_tag}
  notify_team:       {kind: service, via: webhook}
"""

THANKS = """\
Subject: Thank you for your review, ${customer}

Hello ${customer},

thank you for your review: the code ${coupon} takes 10% off your next order.

Unsubscribe: ${unsubscribe_url}
"""

BILLING = """\
Subject: About your invoice

We are sorry about the billing error on the account of ${email}.
"""


# -- helpers --------------------------------------------------------------------------------

def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def one_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def query(db, sql, *args):
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


def outbox(db, via=None):
    """id -> (status, attempts, reason, next_try) of the decisions (of one via)."""
    rows = query(db, "SELECT id, status, attempts, reason, next_try, via FROM decisions"
                     " ORDER BY ts, id")
    return {r[0]: r[1:5] for r in rows if via is None or r[5] == via}


def statuses(db, via=None):
    return Counter(status for status, *_ in outbox(db, via).values())


class Clock:
    """The Deliverer's clock, moved by hand."""

    def __init__(self, now=None):
        self.now = time.time() if now is None else now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


#: the events' day: a few days ago, so that their decisions are fresh (max_age 7d)
DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=5)


def moment(n):
    """The time of event number ``n``: one hour after event n-1."""
    return (DAY + timedelta(hours=10 + n)).isoformat().replace("+00:00", "Z")


def event(n, customer, kind, **props):
    """Event number ``n`` as a JSON line."""
    return json.dumps({"id": f"e{n}", "customer": customer, "type": kind, "at": moment(n),
                       **props})


def identify(customer, *aliases):
    return json.dumps({"type": "identify", "customer": customer, "aliases": list(aliases)})


def customer_events(customers, *kinds, start=0):
    """For each customer: a purchase, then one event of each kind."""
    lines, n = [], start
    for cid in customers:
        for kind, props in (("purchase", {"amount": 30}), *kinds):
            n += 1
            lines.append(event(n, cid, kind, **props))
    return lines


REVIEW = ("review", {"text": "works well", "rating": 5})
CANCEL = ("page_view", {"page": "cancel"})


@pytest.fixture(autouse=True)
def no_settings_from_the_environment(monkeypatch):
    """No RETENTION_* setting and no HTTP proxy: the sinks talk to loopback directly."""
    for name in list(os.environ):
        if name.startswith("RETENTION_") or name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def rules(tmp_path):
    folder = tmp_path / "rules"
    (folder / "templates").mkdir(parents=True)
    (folder / "shop.yaml").write_text(RULES, encoding="utf-8")
    (folder / "templates" / "thanks.txt").write_text(THANKS, encoding="utf-8")
    (folder / "templates" / "billing.txt").write_text(BILLING, encoding="utf-8")
    return folder


@pytest.fixture
def shop(tmp_path, rules):
    """ingest(lines) -> the database, the lines ingested through `retention ingest`."""
    db = tmp_path / "shop.db"

    def ingest(lines):
        path = tmp_path / "events.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        result = invoke("ingest", "--db", db, "--rules", rules, path)
        assert result.exit_code == 0, result.output
        return db

    return ingest


def serving(server):
    """A fixture's body: ``server`` started for the test, stopped after it."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp():
    yield from serving(SmtpServer())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    made = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    if made is None:
        pytest.skip("neither the cryptography package nor the openssl command is available "
                    "to make a self-signed certificate for the STARTTLS test")
    return made


@pytest.fixture
def tls_smtp(certificate):
    cert, key = certificate
    yield from serving(SmtpServer(
        tls_context=server_tls_context(cert, key), require_starttls=True,
        authenticator=authenticator("shop", "s3cret"), auth_require_tls=True))


@pytest.fixture
def receiver():
    yield from serving(HttpReceiver())


def email_settings(server, **more):
    values = {"host": "127.0.0.1", "port": server.port, "from": SENDER,
              "unsubscribe_url": UNSUBSCRIBE, "timeout": 5, **more}
    return [f"email.{key}={value}" for key, value in values.items()]


def sets(settings):
    return [part for s in settings for part in ("--set", s)]


def deliverer(engine, rules, settings, clock, sinks=None, **options):
    values = dict(s.split("=", 1) for s in settings)
    return Deliverer(engine, sinks or plugins.sinks(), settings=Settings(values, environ={}),
                     templates=rules / "templates", clock=clock, **options)


# -- 1. email over SMTP --------------------------------------------------------------------

def test_email_arrives_with_its_template_message_id_and_one_click_unsubscribe(
        shop, rules, smtp, tmp_path):
    db = shop([identify("ann", "email:ann@example.com"),
               *customer_events(["ann"], REVIEW, ("billing_error", {}), ("complaint", {})),
               *customer_events(["bob@example.com"], REVIEW, start=10)])
    ids = {(customer, action): did for did, customer, action in
           query(db, "SELECT id, customer, action FROM decisions")}
    assert len(ids) == 5
    log = tmp_path / "crm.jsonl"
    args = ["deliver", "--db", db, "--rules", rules, *sets(email_settings(smtp)),
            "--route", "crm_task=log", "--set", f"log.path={log}"]

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "sent 4, failed 0",
        "waiting: 1 decision for sink 'crm_tag', which no plugin provides "
        "(retention plugins; or --route crm_tag=SINK)"]

    box = smtp.mailbox
    assert len(box.received) == 3
    [thanks] = [r for r in box.to("ann@example.com")
                if r.decision == ids["ann", "thank_contributor"]]
    mail = thanks.message
    assert thanks.mail_from == "news@shop.example"
    assert mail["To"] == "ann@example.com"
    assert mail["From"] == SENDER
    assert mail["Subject"] == "Thank you for your review, ann"
    body = mail.get_content()
    assert "Hello ann," in body and "the code THANKS10 takes" in body
    assert "Unsubscribe: https://shop.example/u/ann" in body
    assert mail["Message-ID"] == f"<{ids['ann', 'thank_contributor']}@shop.example>"
    assert mail["List-Unsubscribe"] == "<https://shop.example/u/ann>"
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail["Date"]

    [billing] = [r for r in box.to("ann@example.com")
                 if r.decision == ids["ann", "billing_apology"]]
    assert billing.message["Subject"] == "About your invoice"
    assert "the account of ann@example.com." in billing.message.get_content()
    # a service email is not a list: no unsubscribe headers
    assert billing.message["List-Unsubscribe"] is None
    assert billing.message["List-Unsubscribe-Post"] is None

    # a customer whose id is an address gets the mail there
    [bob] = box.to("bob@example.com")
    assert bob.message["Subject"] == "Thank you for your review, bob@example.com"
    # the customer id goes into the URL percent-encoded
    assert bob.message["List-Unsubscribe"] == "<https://shop.example/u/bob%40example.com>"
    assert bob.message["Message-ID"] == f"<{ids['bob@example.com', 'thank_contributor']}" \
                                        "@shop.example>"

    [line] = log.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["data"]["id"] == ids["ann", "call_customer"]

    rows = {did: (status, sent_at) for did, status, sent_at in
            query(db, "SELECT id, status, sent_at FROM decisions")}
    assert {did: s for did, (s, _) in rows.items()} == {
        ids["ann", "thank_contributor"]: "sent", ids["ann", "billing_apology"]: "sent",
        ids["ann", "call_customer"]: "sent", ids["ann", "flag_in_crm"]: "pending",
        ids["bob@example.com", "thank_contributor"]: "sent"}
    assert all(sent_at for s, sent_at in rows.values() if s == "sent")

    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines()[0] == "sent 0, failed 0"
    assert len(box.received) == 3
    assert len(log.read_text(encoding="utf-8").splitlines()) == 1


def test_marketing_email_without_an_unsubscribe_url_stops_before_sending(shop, rules, smtp):
    db = shop(customer_events(["ann@example.com"], REVIEW))
    settings = [s for s in email_settings(smtp) if not s.startswith("email.unsubscribe_url")]
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(settings))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert one_line(result.stderr) == (
        "error: email: marketing email needs RETENTION_EMAIL_UNSUBSCRIBE_URL (an https URL "
        "for one-click unsubscribe, RFC 8058)")
    assert smtp.mailbox.received == []
    assert statuses(db) == {"pending": 1}


def test_values_from_events_cannot_add_headers_and_are_encoded_in_the_unsubscribe_url(
        shop, rules, smtp):
    (rules / "templates" / "billing.txt").write_text(
        "Subject: About the invoice of ${customer}\n\nWe are sorry.\n", encoding="utf-8")
    zed = "zed\nBcc: intruder@evil.example"
    kim = "kim #2&co"
    db = shop([identify(zed, "email:zed@example.com"), identify(kim, "email:kim@example.com"),
               *customer_events([zed], ("billing_error", {})),
               *customer_events([kim], REVIEW, start=5)])
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(email_settings(smtp)))
    assert result.exit_code == 2, result.output
    assert all(r.rcpt_tos != ["intruder@evil.example"] and "intruder@evil.example"
               not in r.rcpt_tos for r in smtp.mailbox.received)
    assert smtp.mailbox.to("zed@example.com") == []
    [(status, reason, next_try)] = query(
        db, "SELECT status, reason, next_try FROM decisions WHERE action = 'billing_apology'")
    assert (status, next_try) == ("failed", None)  # for good: trying again cannot help
    assert reason.endswith("billing.txt: a value has a line break and would change the "
                           "header lines"), reason

    [mail] = smtp.mailbox.to("kim@example.com")
    assert mail.message["Subject"] == "Thank you for your review, kim #2&co"
    assert mail.message["List-Unsubscribe"] == "<https://shop.example/u/kim%20%232%26co>"


def test_a_missing_template_or_address_fails_for_good_with_the_reason(shop, rules, smtp):
    (rules / "templates" / "billing.txt").unlink()
    db = shop([*customer_events(["ann@example.com"], ("billing_error", {})),
               *customer_events(["nomail"], REVIEW, start=5)])
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(email_settings(smtp)))
    assert result.exit_code == 2, result.output
    assert one_line(result.stdout) == "sent 0, failed 2 (2 left for an operator: --retry ID)"
    rows = {action: (status, next_try, reason) for action, status, next_try, reason in query(
        db, "SELECT action, status, next_try, reason FROM decisions")}
    missing = rules / "templates" / "billing.txt"
    assert rows == {
        "billing_apology": ("failed", None, f"template {missing}: No such file or directory"),
        "thank_contributor": ("failed", None, "no email address for customer nomail: link "
                              'one with an identify event ("aliases": ["email:..."])')}
    assert smtp.mailbox.received == []


def test_a_connection_the_server_dropped_between_runs_is_reopened_not_failed(
        shop, rules, smtp):
    db = shop(customer_events([f"c{n}@example.com" for n in range(4)], REVIEW))
    clock = Clock()
    with Engine.open(db) as engine:
        d = deliverer(engine, rules, email_settings(smtp), clock)
        try:
            assert d.run(limit=2).sent == 2  # the sink keeps its connection open...
            smtp.stop()  # ...and the server restarts, or drops it while idle
            smtp.start()
            report = d.run()
        finally:
            d.close()
    assert (report.sent, report.failed) == (2, 0), report.errors
    assert sorted(smtp.mailbox.decisions()) == sorted(outbox(db))
    assert statuses(db) == {"sent": 4}


# -- 2. STARTTLS and login ------------------------------------------------------------------

def test_starttls_and_login_deliver_over_an_authenticated_tls_session(
        shop, rules, tls_smtp, certificate):
    db = shop(customer_events(["ann@example.com", "bob@example.com"], REVIEW))
    cert, _ = certificate
    settings = email_settings(tls_smtp, starttls="true", username="shop", password="s3cret",
                              cafile=cert)
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(settings))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "sent 2, failed 0"
    received = tls_smtp.mailbox.received
    assert sorted(r.rcpt_tos[0] for r in received) == ["ann@example.com", "bob@example.com"]
    assert all(r.tls and r.authenticated and r.login == "shop" for r in received)
    assert statuses(db) == {"sent": 2}


def test_a_wrong_smtp_password_stops_the_run_and_leaves_every_decision_pending(
        shop, rules, tls_smtp, certificate):
    db = shop(customer_events(["ann@example.com", "bob@example.com", "cy@example.com"],
                              REVIEW))
    cert, _ = certificate
    settings = email_settings(tls_smtp, starttls="true", username="shop", password="wrong",
                              cafile=cert)
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(settings))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    line = one_line(result.stderr)
    assert line.startswith("error: email: the SMTP server refused the login: 535"), line
    assert tls_smtp.mailbox.received == []
    # nothing is spent on a configuration problem: not failed, not left claimed
    assert {did: row[:3] for did, row in outbox(db).items()} == {
        did: ("pending", 0, None) for did in outbox(db)}


def test_an_untrusted_server_certificate_stops_the_run_and_leaves_decisions_pending(
        shop, rules, tls_smtp):
    db = shop(customer_events(["ann@example.com", "bob@example.com"], REVIEW))
    settings = email_settings(tls_smtp, starttls="true", username="shop", password="s3cret")
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(settings))
    assert result.exit_code == 1, result.output
    line = one_line(result.stderr)
    assert line.startswith("error: email: the certificate of 127.0.0.1 is not trusted"), line
    assert "email.cafile" in line
    assert tls_smtp.mailbox.received == []
    assert statuses(db) == {"pending": 2}


def test_a_server_that_requires_starttls_when_it_is_not_configured_stops_the_run(
        shop, rules, tls_smtp):
    db = shop(customer_events(["ann@example.com", "bob@example.com"], REVIEW))
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(email_settings(tls_smtp)))
    assert result.exit_code == 1, result.output
    line = one_line(result.stderr)
    assert line.startswith("error: email: ") and "530" in line and "STARTTLS" in line, line
    assert tls_smtp.mailbox.received == []
    assert statuses(db) == {"pending": 2}


# -- 3. the SMTP server goes away mid-run, and comes back -------------------------------------

def test_an_smtp_server_stopped_mid_run_gets_every_decision_exactly_once_when_back(
        shop, rules, smtp):
    customers = [f"c{n:02d}@example.com" for n in range(36)]
    db = shop(customer_events(customers, REVIEW))
    every = list(outbox(db))
    assert len(every) == 36
    up_for = 12

    class StopsTheServer:
        """The real email sink; the SMTP server is stopped before its 13th message."""

        def __init__(self, settings):
            self.sink = EmailSink(settings)
            self.count = 0

        def deliver(self, delivery):
            if self.count == up_for:
                smtp.stop()
            self.count += 1
            self.sink.deliver(delivery)

        def close(self):
            self.sink.close()

    sinks = {**plugins.sinks(), "email": StopsTheServer}
    clock = Clock()
    with Engine.open(db) as engine:
        d = deliverer(engine, rules, email_settings(smtp), clock, sinks,
                      max_attempts=5, base_backoff=30)
        try:
            first = d.run()
            # five failures in a row pause the sink: the rest wait, untried
            assert (first.sent, first.failed, first.gave_up) == (up_for, BREAKER, 0)
            assert "5 failures in a row" in first.paused["email"]
            assert not smtp.running
            failed = {did: row for did, row in outbox(db).items() if row[0] == "failed"}
            assert list(failed) == every[up_for:up_for + BREAKER]
            for _, attempts, reason, next_try in failed.values():
                assert attempts == 1
                assert reason.startswith(f"SMTP 127.0.0.1:{smtp.port}: "), reason
                assert next_try == clock.now + 30
            waiting = {did: row for did, row in outbox(db).items() if row[0] == "pending"}
            assert list(waiting) == every[up_for + BREAKER:]
            assert {row[1] for row in waiting.values()} == {0}
            # the server is down and nothing failed is due: each run tries the sink, and
            # pauses it again after five failures
            again = d.run()
            assert (again.sent, again.failed) == (0, BREAKER)

            smtp.start()  # back on the same port
            clock.advance(29)
            # the untried ones go at once; the failed ones wait for their backoff
            back = d.run()
            assert (back.sent, back.failed, back.paused) == (36 - up_for - 2 * BREAKER, 0, {})
            clock.advance(1)
            last = d.run()
            assert (last.sent, last.failed) == (2 * BREAKER, 0)
        finally:
            d.close()

    arrived = Counter(smtp.mailbox.decisions())
    assert set(arrived) == set(every)
    assert set(arrived.values()) == {1}, [did for did, n in arrived.items() if n > 1]
    ids = Counter(r.message["Message-ID"] for r in smtp.mailbox.received)
    assert len(ids) == 36 and set(ids.values()) == {1}
    assert statuses(db) == {"sent": 36}
    assert Counter(row[1] for row in outbox(db).values()) == {
        1: 36 - 2 * BREAKER, 2: 2 * BREAKER}


def test_an_smtp_421_is_tried_again_later_and_a_550_fails_for_good(shop, rules, smtp):
    db = shop(customer_events(["ann@example.com", "bob@example.com"], REVIEW))
    ann, bob = outbox(db)
    clock = Clock()
    with Engine.open(db) as engine:
        d = deliverer(engine, rules, email_settings(smtp), clock, base_backoff=60)
        try:
            smtp.mailbox.reply = "421 4.3.2 System not accepting messages, try later"
            report = d.retry(ann)
            assert (report.sent, report.failed, report.gave_up) == (0, 1, 0)
            status, attempts, reason, next_try = outbox(db)[ann]
            assert (status, attempts, next_try) == ("failed", 1, clock.now + 60)
            assert reason == "SMTP server: 421 4.3.2 System not accepting messages, try later"

            smtp.mailbox.reply = "550 5.7.1 Message refused"
            report = d.retry(bob)
            assert (report.sent, report.failed, report.gave_up) == (0, 1, 1)
            assert outbox(db)[bob] == ("failed", 1, "SMTP server: 550 5.7.1 Message refused",
                                       None)

            smtp.mailbox.reply = None
            clock.advance(60)
            report = d.run()
            assert (report.sent, report.failed) == (1, 0)
            clock.advance(10**6)
            assert d.run().sent == 0  # the refused one waits for an operator
        finally:
            d.close()
    assert smtp.mailbox.decisions() == [ann]
    assert outbox(db)[ann][:2] == ("sent", 2)


# -- 4. webhooks ------------------------------------------------------------------------------

def webhook_settings(receiver, url=None):
    return [f"webhook.url={url or receiver.url}", f"webhook.secret={SECRET}", "webhook.timeout=5"]


def test_a_webhook_is_signed_the_standard_webhooks_way(shop, rules, receiver):
    db = shop([*customer_events(["c-1"], CANCEL), *customer_events(["c-2"], ("complaint", {}),
                                                                   start=5)])
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(webhook_settings(receiver)),
                    "--route", "crm_task=webhook")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "sent 2, failed 0"

    expected = {did for did, via in query(db, "SELECT id, via FROM decisions")
                if via in ("webhook", "crm_task")}
    assert {hit.headers["webhook-id"] for hit in receiver.hits} == expected
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    for hit in receiver.hits:
        headers = hit.headers
        assert hit.path == "/hooks/retention"
        assert headers["content-type"] == "application/json"
        msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
        assert abs(int(stamp) - time.time()) < 60
        # the project's own verifier...
        assert verify(SECRET, hit.body, headers, now=time.time()) == msg_id
        # ...and the spec computed here: base64 HMAC-SHA256 of "id.timestamp.body"
        digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + hit.body, hashlib.sha256)
        assert f"v1,{base64.b64encode(digest.digest()).decode()}" in \
            headers["webhook-signature"].split()
        with pytest.raises(SignatureError):
            verify(SECRET, hit.body.replace(b"c-", b"x-"), headers, now=time.time())
        payload = hit.json()
        assert payload["type"] == "retention.decision"
        assert payload["data"]["id"] == msg_id
    assert {(h.json()["data"]["customer"], h.json()["data"]["action"]) for h in receiver.hits} \
        == {("c-1", "notify_team"), ("c-2", "call_customer")}
    assert statuses(db, "webhook") == {"sent": 1}
    assert statuses(db, "crm_task") == {"sent": 1}


def test_a_webhook_answering_500_backs_off_then_waits_for_an_operator_retry(
        shop, rules, receiver):
    db = shop(customer_events(["c-1"], CANCEL))
    [did] = outbox(db)
    url = receiver.url
    receiver.status = 500
    clock = Clock()
    with Engine.open(db) as engine:
        d = deliverer(engine, rules, webhook_settings(receiver), clock, max_attempts=4,
                      base_backoff=30)
        try:
            for attempt, wait in ((1, 30), (2, 60), (3, 120)):  # doubled each time
                report = d.run()
                assert (report.sent, report.failed, report.gave_up) == (0, 1, 0)
                assert len(receiver.hits) == attempt
                assert outbox(db)[did] == ("failed", attempt,
                                           f"{url} answered 500 Internal Server Error",
                                           clock.now + wait)
                assert d.run().failed == 0  # not due yet: not tried
                clock.advance(wait - 1)
                assert d.run().failed == 0
                clock.advance(1)
            report = d.run()  # the fourth and last try
            assert (report.sent, report.failed, report.gave_up) == (0, 1, 1)
            assert report.errors == [f"{did}: {url} answered 500 Internal Server Error"]
            assert outbox(db)[did] == ("failed", 4, f"{url} answered 500 Internal Server Error",
                                       None)
            clock.advance(10**7)
            assert d.run().failed == 0
        finally:
            d.close()
    assert len(receiver.hits) == 4

    listed = invoke("decisions", "--db", db, "--status", "failed", "--json")
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.stdout)
    assert (row["id"], row["status"], row["reason"]) == (
        did, "failed", f"{url} answered 500 Internal Server Error")

    receiver.status = 200
    args = ["deliver", "--db", db, "--rules", rules, *sets(webhook_settings(receiver))]
    retried = invoke(*args, "--retry", did)
    assert retried.exit_code == 0, retried.output
    assert one_line(retried.stdout) == "sent 1, failed 0"
    assert [h.status for h in receiver.hits] == [500, 500, 500, 500, 200]
    assert {h.headers["webhook-id"] for h in receiver.hits} == {did}  # the idempotency key
    assert outbox(db)[did][:3] == ("sent", 1, None)

    again = invoke(*args, "--retry", did)
    assert again.exit_code == 1
    assert one_line(again.stderr) == (f"error: decision {did} is sent: only a failed or "
                                      "pending decision can be retried")
    assert len(receiver.hits) == 5


def test_max_attempts_on_the_command_line_leaves_a_failure_for_an_operator(
        shop, rules, receiver):
    db = shop(customer_events(["c-1"], CANCEL))
    [did] = outbox(db)
    receiver.status = 503
    args = ["deliver", "--db", db, "--rules", rules, *sets(webhook_settings(receiver))]
    result = invoke(*args, "--max-attempts", "1")
    assert result.exit_code == 2, result.output
    assert one_line(result.stdout) == "sent 0, failed 1 (1 left for an operator: --retry ID)"
    assert one_line(result.stderr) == \
        f"failed: {receiver.url} answered 503 Service Unavailable (decision {did})"
    listed = invoke("decisions", "--db", db, "--status", "failed")
    assert listed.exit_code == 0 and "notify_team" in listed.stdout
    assert "answered 503" in listed.stdout

    later = invoke(*args)  # a later run does not try it again
    assert later.exit_code == 0, later.output
    assert one_line(later.stdout) == "sent 0, failed 0"
    assert len(receiver.hits) == 1

    receiver.status = 204
    assert invoke(*args, "--retry", did).exit_code == 0
    assert len(receiver.hits) == 2 and outbox(db)[did][0] == "sent"

    unknown = invoke(*args, "--retry", "no-such-id")
    assert unknown.exit_code == 1
    assert one_line(unknown.stderr) == "error: no decision 'no-such-id' in the outbox"


@pytest.mark.parametrize(("status", "permanent"), [
    (400, True), (404, True), (410, True), (422, True),
    (408, False), (429, False), (500, False), (502, False), (503, False)])
def test_a_webhook_4xx_fails_for_good_and_a_5xx_or_429_is_retried(
        shop, rules, receiver, status, permanent):
    db = shop(customer_events(["c-1"], CANCEL))
    [did] = outbox(db)
    receiver.status = status
    clock = Clock()
    with Engine.open(db) as engine:
        d = deliverer(engine, rules, webhook_settings(receiver), clock)
        try:
            report = d.run()
            assert (report.failed, report.gave_up) == (1, int(permanent))
            state, attempts, reason, next_try = outbox(db)[did]
            assert (state, attempts) == ("failed", 1)
            assert reason.startswith(f"{receiver.url} answered {status} ")
            assert (next_try is None) == permanent
            receiver.status = 200
            clock.advance(3600)
            assert d.run().sent == int(not permanent)
        finally:
            d.close()
    assert len(receiver.hits) == 1 + (not permanent)


@pytest.mark.parametrize(("status", "retry_after", "wait"), [
    (429, "600", 600.0), (503, "7200", 7200.0), (429, "soon", 30.0), (429, None, 30.0),
    (429, "in an hour", 3600.0)])
def test_a_retry_after_is_waited_for_and_the_sink_waits_for_the_next_run(
        shop, rules, receiver, status, retry_after, wait):
    db = shop(customer_events(["c-1", "c-2"], CANCEL))
    receiver.status = status
    if retry_after == "in an hour":  # an HTTP date
        retry_after = email.utils.formatdate(time.time() + 3600, usegmt=True)
    if retry_after is not None:
        receiver.headers["Retry-After"] = retry_after
    clock = Clock()
    with Engine.open(db) as engine:
        d = deliverer(engine, rules, webhook_settings(receiver), clock)
        try:
            report = d.run()
        finally:
            d.close()
    waits = sorted(next_try - clock() for _, _, _, next_try in outbox(db).values()
                   if next_try is not None)
    if retry_after not in ("soon", None):
        # asked to wait: one try, that wait, and the other decision left for later
        assert len(receiver.hits) == 1 and report.failed == 1
        assert waits == [pytest.approx(wait, abs=2)]
        assert "rate limited" in report.paused["webhook"]
    else:  # the run's own backoff, and the run goes on
        assert len(receiver.hits) == 2 and waits == [wait, wait]
        assert "webhook" not in report.paused


def test_a_webhook_redirect_is_not_a_delivery(shop, rules, receiver):
    db = shop(customer_events(["c-1"], CANCEL))
    [did] = outbox(db)
    receiver.status = 301
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(webhook_settings(receiver)))
    assert result.exit_code == 2, result.output
    # the body was POSTed once, and no GET followed it to count as a delivery
    assert [(h.method, h.path) for h in receiver.hits] == [("POST", "/hooks/retention")]
    status, attempts, reason, next_try = outbox(db)[did]
    assert (status, attempts) == ("failed", 1) and next_try is not None
    assert reason.startswith(f"{receiver.url} answered 301 Moved Permanently"), reason
    assert "redirects are not followed" in reason


def test_a_webhook_nobody_listens_to_is_tried_again_later(shop, rules, receiver):
    db = shop(customer_events(["c-1"], CANCEL))
    [did] = outbox(db)
    receiver.stop()  # the port is free now: connections are refused
    url = receiver.url
    clock = Clock()
    with Engine.open(db) as engine:
        d = deliverer(engine, rules, webhook_settings(receiver, url), clock)
        try:
            report = d.run()
        finally:
            d.close()
    assert (report.failed, report.gave_up) == (1, 0)
    state, _, reason, next_try = outbox(db)[did]
    assert state == "failed" and next_try is not None
    assert reason.startswith(f"{url}: ") and "refused" in reason.lower(), reason


# -- 5. the log sink, routes, and sinks nobody provides ---------------------------------------

def test_the_log_sink_and_routes_and_decisions_waiting_for_a_sink(shop, rules, tmp_path):
    db = shop(customer_events(["c-1", "c-2"], ("complaint", {})))
    log = tmp_path / "out" / "deliveries.jsonl"
    log.parent.mkdir()
    base = ["deliver", "--db", db, "--rules", rules, "--set", f"log.path={log}"]

    unrouted = invoke(*base)
    assert unrouted.exit_code == 0, unrouted.output
    assert unrouted.stdout.splitlines() == [
        "sent 0, failed 0",
        "waiting: 2 decisions for sink 'crm_tag', which no plugin provides "
        "(retention plugins; or --route crm_tag=SINK)",
        "waiting: 2 decisions for sink 'crm_task', which no plugin provides "
        "(retention plugins; or --route crm_task=SINK)"]
    assert statuses(db) == {"pending": 4}
    assert not log.exists()

    routed = invoke(*base, "--route", "crm_task=log")
    assert routed.exit_code == 0, routed.output
    assert routed.stdout.splitlines()[0] == "sent 2, failed 0"
    assert "for sink 'crm_task'" not in routed.stdout
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [line["type"] for line in lines] == ["retention.decision"] * 2
    assert {line["data"]["id"] for line in lines} == set(outbox(db, "crm_task"))
    assert {line["data"]["customer"] for line in lines} == {"c-1", "c-2"}
    assert statuses(db, "crm_task") == {"sent": 2}
    assert statuses(db, "crm_tag") == {"pending": 2}

    assert invoke(*base, "--route", "crm_task=log").stdout.splitlines()[0] == "sent 0, failed 0"
    assert len(log.read_text(encoding="utf-8").splitlines()) == 2

    unknown = invoke(*base, "--route", "crm_tag=fax")
    assert unknown.exit_code == 1
    assert one_line(unknown.stderr).startswith("error: --route crm_tag=fax: no sink named 'fax'")


def test_a_log_file_that_cannot_be_written_fails_the_decision_with_the_reason(
        shop, rules, tmp_path):
    db = shop(customer_events(["c-1"], ("complaint", {})))
    missing = tmp_path / "no-such-folder" / "deliveries.jsonl"
    result = invoke("deliver", "--db", db, "--rules", rules, "--set", f"log.path={missing}",
                    "--route", "crm_task=log")
    assert result.exit_code == 2, result.output
    [(status, attempts, reason, next_try)] = outbox(db, "crm_task").values()
    assert (status, attempts) == ("failed", 1) and next_try is not None
    assert reason == f"log sink: cannot write {missing}: No such file or directory"


# -- 6. a process that dies mid-delivery --------------------------------------------------------

def test_a_deliver_process_killed_mid_delivery_loses_nothing_and_repeats_nothing(
        shop, rules, smtp, tmp_path):
    customers = [f"c{n:02d}@example.com" for n in range(10)]
    db = shop(customer_events(customers, REVIEW))
    every = list(outbox(db))
    smtp.mailbox.hold_at = 4  # the 4th message is never answered: the sender hangs there
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETENTION_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "retention.cli", "deliver", "--db", str(db), "--rules",
         str(rules), *sets(email_settings(smtp, timeout=60))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        if not smtp.mailbox.holding.wait(30):
            process.kill()
            out, err = process.communicate(timeout=10)
            pytest.fail(f"the deliver process never reached the 4th message: {out} {err}")
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    assert smtp.mailbox.decisions() == every[:3]
    # what it had claimed is still its own: not pending, not lost
    assert statuses(db) == {"sent": 3, "sending": 7}
    smtp.mailbox.hold_at = None

    with Engine.open(db) as engine:
        soon = deliverer(engine, rules, email_settings(smtp), Clock(time.time() + 60))
        try:
            assert (soon.run().sent, soon.run().failed) == (0, 0)  # the lease still holds
        finally:
            soon.close()
        later = deliverer(engine, rules, email_settings(smtp), Clock(time.time() + LEASE + 1))
        try:
            report = later.run()
        finally:
            later.close()
    assert (report.sent, report.failed) == (7, 0)
    arrived = Counter(smtp.mailbox.decisions())
    assert set(arrived) == set(every) and set(arrived.values()) == {1}
    assert statuses(db) == {"sent": 10}
    assert {did: row[1] for did, row in outbox(db).items()} == {
        did: 1 if n < 3 else 2 for n, did in enumerate(every)}


def test_claimed_decisions_of_a_vanished_deliverer_are_delivered_after_the_lease(
        shop, rules, tmp_path):
    db = shop(customer_events(["c-1", "c-2", "c-3"], ("complaint", {})))
    log = tmp_path / "deliveries.jsonl"
    settings = [f"log.path={log}"]
    clock = Clock()
    with Engine.open(db) as engine:
        gone = deliverer(engine, rules, settings, clock, routes={"crm_task": "log"})
        claimed = [claim.decision.id for claim in gone._claim(10)]
        del gone  # the process died holding them
        assert sorted(claimed) == sorted(outbox(db, "crm_task"))
        assert statuses(db, "crm_task") == {"sending": 3}

        clock.advance(LEASE - 1)
        d = deliverer(engine, rules, settings, clock, routes={"crm_task": "log"})
        assert d.run().sent == 0 and not log.exists()
        clock.advance(1)
        assert d.run().sent == 3
        assert d.run().sent == 0
    ids = [json.loads(line)["data"]["id"] for line in log.read_text().splitlines()]
    assert sorted(ids) == sorted(claimed)
    assert statuses(db, "crm_task") == {"sent": 3}


def test_an_interrupted_run_gives_back_what_it_had_not_started(shop, rules, tmp_path):
    customers = [f"c-{n}" for n in range(6)]
    db = shop(customer_events(customers, ("complaint", {})))
    order = list(outbox(db, "crm_task"))
    log = tmp_path / "deliveries.jsonl"
    LogSink = plugins.sinks()["log"]

    class Interrupted:
        """The log sink; Ctrl-C arrives during the third delivery."""

        def __init__(self, settings):
            self.sink = LogSink(settings)
            self.count = 0

        def deliver(self, delivery):
            self.count += 1
            if self.count == 3:
                raise KeyboardInterrupt
            self.sink.deliver(delivery)

    sinks = {**plugins.sinks(), "crm_task": Interrupted}
    clock = Clock()
    with Engine.open(db) as engine:
        d = deliverer(engine, rules, [f"log.path={log}"], clock, sinks)
        with pytest.raises(KeyboardInterrupt):
            d.run()
        rows = outbox(db, "crm_task")
        # two sent; the one in flight has an unknown outcome: it stays claimed until its
        # lease runs out; the ones not started yet are pending again at once
        assert [rows[did][:2] for did in order] == [
            ("sent", 1), ("sent", 1), ("sending", 1),
            ("pending", 0), ("pending", 0), ("pending", 0)]

        d = deliverer(engine, rules, [f"log.path={log}"], clock,
                      routes={"crm_task": "log"})
        assert d.run().sent == 3
        clock.advance(LEASE)
        assert d.run().sent == 1
    ids = [json.loads(line)["data"]["id"] for line in log.read_text().splitlines()]
    assert sorted(ids) == sorted(order)
    assert statuses(db, "crm_task") == {"sent": 6}


# -- 7. erasure after a failed delivery -----------------------------------------------------------

def test_forget_after_a_failed_delivery_leaves_no_identifier_in_the_outbox(
        shop, rules, smtp, tmp_path):
    db = shop([identify("dora-5150", "email:dora-5150@example.com"),
               *customer_events(["carl-7731", "dora-5150"], REVIEW)])
    smtp.mailbox.reply = "550 5.1.1 <dora-5150@example.com>: mailbox unavailable"
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(email_settings(smtp)))
    assert result.exit_code == 2, result.output
    reasons = {customer: reason for customer, status, reason in
               query(db, "SELECT customer, status, reason FROM decisions")
               if status == "failed"}
    assert reasons == {
        "carl-7731": "no email address for customer carl-7731: link one with an identify "
                     'event ("aliases": ["email:..."])',
        "dora-5150": "SMTP server: 550 5.1.1 <dora-5150@example.com>: mailbox unavailable"}

    for customer in ("carl-7731", "dora-5150"):
        forgot = invoke("forget", "--db", db, customer, "--yes")
        assert forgot.exit_code == 0, forgot.output
    for (reason,) in query(db, "SELECT reason FROM decisions"):
        assert reason is None or ("carl" not in reason and "dora" not in reason), reason
    # kept as anonymous counts, and never tried again
    assert query(db, "SELECT status, reason, customer FROM decisions") == [
        ("failed", None, None)] * 2
    retried = invoke("deliver", "--db", db, "--rules", rules, *sets(email_settings(smtp)))
    assert retried.exit_code == 0 and retried.stdout.startswith("sent 0, failed 0")
    for path in tmp_path.iterdir():
        if path.name.startswith(db.name):
            data = path.read_bytes()
            assert b"carl-7731" not in data and b"dora-5150" not in data, path



def test_a_sink_that_cannot_work_leaves_its_decisions_waiting_and_the_others_go(
        shop, rules, tmp_path):
    # email has no host: its decisions wait untouched; crm_task goes through the log sink
    db = shop(customer_events(["ann@example.com"], REVIEW, ("complaint", {})))
    log = tmp_path / "deliveries.jsonl"
    result = invoke("deliver", "--db", db, "--rules", rules, "--set", f"log.path={log}",
                    "--route", "crm_task=log")
    assert result.exit_code == 1, result.output
    assert one_line(result.stderr) == (
        "error: email: set RETENTION_EMAIL_HOST (or --set email.host=...)")
    assert result.stdout.splitlines()[0] == "sent 1, failed 0"
    assert "not delivered: sink 'email' cannot work" in result.stdout
    assert statuses(db, "crm_task") == {"sent": 1}
    assert statuses(db, "email") == {"pending": 1}
    assert query(db, "SELECT attempts FROM decisions WHERE via = 'email'") == [(0,)]
    assert len(log.read_text().splitlines()) == 1


def test_a_run_tries_a_decision_once_even_without_backoff(shop, rules, receiver):
    db = shop(customer_events(["c-1"], CANCEL))
    receiver.status = 500
    clock = Clock()
    with Engine.open(db) as engine:
        d = deliverer(engine, rules, webhook_settings(receiver), clock, base_backoff=0,
                      max_attempts=5)
        try:
            report = d.run()
            assert (report.sent, report.failed, report.gave_up) == (0, 1, 0)
            assert len(receiver.hits) == 1
            receiver.status = 200
            clock.advance(1)
            assert d.run().sent == 1  # a later run tries it again
        finally:
            d.close()
    assert len(receiver.hits) == 2


def test_a_claim_whose_lease_ran_out_does_not_overwrite_the_new_owner(shop, rules, tmp_path):
    db = shop(customer_events(["c-1"], ("complaint", {})))
    settings = [f"log.path={tmp_path / 'log.jsonl'}"]
    routes = {"crm_task": "log", "crm_tag": "log"}
    slow, fast = Clock(), Clock()
    fast.advance(LEASE + 1)
    with Engine.open(db) as first, Engine.open(db) as second:
        a = deliverer(first, rules, settings, slow, routes=routes)
        b = deliverer(second, rules, settings, fast, routes=routes)
        claims = a._claim(10)
        assert len(claims) == 2
        assert b.run().sent == 2  # a's lease ran out: b takes and delivers them
        a._failed(claims[0], "timed out, too late", False, DeliveryReport())
        a._release(claims[1])
    assert statuses(db) == {"sent": 2}
    assert query(db, "SELECT count(*) FROM decisions WHERE reason IS NOT NULL") == [(0,)]


def test_an_address_list_in_an_identifier_adds_no_recipient(shop, rules, smtp):
    sneaky = "bob@example.com,eve@evil.example"
    db = shop([*customer_events([sneaky], REVIEW),
               identify("dan", "email:dan@example.com, eve@evil.example"),
               *customer_events(["dan"], REVIEW, start=5)])
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(email_settings(smtp)))
    assert result.exit_code == 2, result.output
    assert smtp.mailbox.received == []
    reasons = [r for (r,) in query(db, "SELECT reason FROM decisions WHERE status = 'failed'"
                                       " AND next_try IS NULL ORDER BY reason")]
    assert reasons == ["'bob@example.com,eve@evil.example' is not one email address",
                       "'dan@example.com, eve@evil.example' is not one email address"]


def test_a_late_unsubscribe_holds_back_a_failed_marketing_email(shop, rules, smtp):
    db = shop(customer_events(["ann@example.com"], REVIEW))
    smtp.stop()
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(email_settings(smtp)))
    assert result.exit_code == 2, result.output
    assert statuses(db) == {"failed": 1}
    # an unsubscribe dated before the review arrives late: the thanks must not go
    late = json.dumps({"id": "u1", "customer": "ann@example.com", "type": "unsubscribe",
                       "at": moment(1).replace(":00:00Z", ":30:00Z")})
    assert invoke("ingest", "--db", db, "-", input=late + "\n").exit_code == 0
    assert query(db, "SELECT status, reason FROM decisions") == [("suppressed", "consent")]
    smtp.start()
    assert invoke("deliver", "--db", db, "--rules", rules,
                  *sets(email_settings(smtp))).exit_code == 0
    assert smtp.mailbox.received == []


def test_a_login_without_starttls_is_refused_before_any_password_is_sent(shop, rules, smtp):
    db = shop(customer_events(["ann@example.com"], REVIEW))
    settings = email_settings(smtp, username="shop", password="secret")
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(settings))
    assert result.exit_code == 1, result.output
    assert one_line(result.stderr).startswith(
        "error: email: a login without STARTTLS would send the password in clear")
    assert smtp.mailbox.received == [] and statuses(db) == {"pending": 1}


# -- 8. freshness: old decisions expire, never sent -------------------------------------------

def days_ago(days, hour=0):
    """An instant ``days`` days (and ``hour`` hours) before now, as event time."""
    moment = datetime.now(UTC) - timedelta(days=days) + timedelta(hours=hour)
    return moment.isoformat(timespec="seconds")


def dated_events(customers_days, kind=("complaint", {})):
    """For each (customer, days ago): a purchase, then one event of ``kind`` an hour on."""
    lines, n = [], 0
    for cid, days in customers_days:
        for what, props, hour in (("purchase", {"amount": 30}, 0), (*kind, 1)):
            n += 1
            lines.append(event(n, cid, what, at=days_ago(days, hour), **props))
    return lines


def test_a_backfill_delivers_only_the_decisions_younger_than_their_max_age(
        shop, rules, tmp_path):
    db = shop(dated_events([("old", 40), ("recent", 2)]))
    log = tmp_path / "deliveries.jsonl"
    args = ["deliver", "--db", db, "--rules", rules, "--set", f"log.path={log}",
            "--route", "crm_task=log", "--route", "crm_tag=log"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert one_line(result.stdout) == (
        "sent 2, failed 0, expired 2 (older than their max_age: "
        "retention decisions --status expired)")
    sent = [json.loads(line)["data"] for line in log.read_text().splitlines()]
    assert {(d["customer"], d["action"]) for d in sent} == {
        ("recent", "call_customer"), ("recent", "flag_in_crm")}
    rows = query(db, "SELECT customer, status, reason, attempts FROM decisions ORDER BY ts")
    assert [(c, s, a) for c, s, _, a in rows] == [
        ("old", "expired", 0), ("old", "expired", 0), ("recent", "sent", 1),
        ("recent", "sent", 1)]
    assert rows[0][2].startswith("older than its max_age of 7d when delivery reached it at ")
    assert rows[0][2].endswith(": not sent")

    listed = invoke("decisions", "--db", db, "--status", "expired", "--json")
    assert listed.exit_code == 0, listed.output
    assert {(d["customer"], d["status"]) for d in json.loads(listed.stdout)} == {
        ("old", "expired")}
    report = json.loads(invoke("stats", "--db", db, "--json").stdout)
    assert {(d["action"], d["status"]): d["count"] for d in report["decisions"]} == {
        ("call_customer", "expired"): 1, ("call_customer", "sent"): 1,
        ("flag_in_crm", "expired"): 1, ("flag_in_crm", "sent"): 1}
    again = invoke(*args, "--json")  # expired for good: the next run sends nothing
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["sent"] == json.loads(again.stdout)["expired"] == 0
    assert len(log.read_text().splitlines()) == 2


def test_an_actions_max_age_in_the_rules_wins_over_the_default(shop, rules, tmp_path):
    text = (rules / "shop.yaml").read_text()
    (rules / "shop.yaml").write_text(text.replace(
        "call_customer:     {kind: service, via: crm_task}",
        "call_customer:     {kind: service, via: crm_task, max_age: 3d}"))
    db = shop(dated_events([("c-1", 2)]))  # two days old
    args = ["deliver", "--db", db, "--rules", rules, "--set", f"log.path={tmp_path / 'l'}",
            "--route", "crm_task=log", "--route", "crm_tag=log", "--json"]
    result = invoke(*args, "--max-age", "1d")
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["sent"], json.loads(result.stdout)["expired"]) == (1, 1)
    assert dict(query(db, "SELECT action, status FROM decisions")) == {
        "call_customer": "sent", "flag_in_crm": "expired"}
    [(reason,)] = query(db, "SELECT reason FROM decisions WHERE status = 'expired'")
    assert reason.startswith("older than its max_age of 1d ")


def test_in_purchase_decisions_never_expire(shop, rules, tmp_path):
    (rules / "shop.yaml").write_text(RULES.replace("\nactions:\n", (
        "\nrecognition:\n  welcome: {every: 1, when: event.type == \"purchase\","
        " then: [discount_now, {receipt_note: {text: thanks}}]}\n"
        "actions:\n  discount_now: {kind: in_purchase}\n"
        "  receipt_note: {kind: in_purchase, via: receipts}\n")))
    db = shop(dated_events([("c-1", 90)]))
    result = invoke("deliver", "--db", db, "--rules", rules, "--route", "receipts=log",
                    "--set", f"log.path={tmp_path / 'receipts.jsonl'}", "--json")
    assert result.exit_code == 0, result.output
    # answered in the purchase: the cart had it then; a sink that records it still does
    assert dict(query(db, "SELECT action, status FROM decisions WHERE kind = 'in_purchase'")
                ) == {"discount_now": "pending", "receipt_note": "sent"}


def test_a_decision_that_grows_too_old_during_a_run_expires_when_the_run_reaches_it(
        shop, rules):
    db = shop(customer_events(["c-1", "c-2"], CANCEL))  # c-2's two hours after c-1's
    [(first,)] = query(db, "SELECT ts FROM decisions WHERE customer = 'c-1'")
    clock = Clock(first + 7 * 86400 - 1800)  # both younger than 7 days when the run begins
    reached = []

    class Slow:
        """A sink that takes three hours to deliver (moving the clock)."""

        def __init__(self, settings):
            pass

        def deliver(self, delivery):
            reached.append(delivery.decision.customer)
            clock.advance(3 * 3600)

    with Engine.open(db) as engine:
        d = deliverer(engine, rules, [], clock, sinks={"webhook": Slow})
        report = d.run(chunk=1)
    assert reached == ["c-1"]
    assert (report.sent, report.expired) == (1, 1)
    assert dict(query(db, "SELECT customer, status FROM decisions")) == {
        "c-1": "sent", "c-2": "expired"}


def test_an_operators_retry_of_a_failed_decision_past_its_max_age_expires_it(
        shop, rules, receiver):
    db = shop(customer_events(["c-1"], CANCEL))
    [did] = outbox(db)
    receiver.status = 500
    clock = Clock()
    with Engine.open(db) as engine:
        d = deliverer(engine, rules, webhook_settings(receiver), clock, max_attempts=1)
        try:
            assert d.run().gave_up == 1
            clock.advance(7 * 86400)
            receiver.status = 200
            report = d.retry(did)
        finally:
            d.close()
    assert (report.sent, report.expired) == (0, 1)
    assert len(receiver.hits) == 1
    assert outbox(db)[did][0] == "expired"


def test_max_age_in_a_rule_file_is_a_duration_with_errors_at_their_line(tmp_path):
    rules = tmp_path / "shop.yaml"
    rules.write_text(
        "capital: {initial: 70}\n"
        "rules:\n"
        "  complaint: {when: event.type == \"complaint\", points: -5,"
        " then: [call_customer, flag_in_crm, discount_now]}\n"
        "actions:\n"
        "  call_customer: {kind: service, via: crm_task, max_age: soon}\n"
        "  flag_in_crm: {kind: service, via: crm_tag, max_age: 0d}\n"
        "  discount_now: {kind: in_purchase, max_age: 2d}\n", encoding="utf-8")
    result = invoke("check", rules)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{rules}:5:58: max_age: expected a duration like 90d, 12h or 2w, got 'soon'",
        f"{rules}:6:55: max_age must be longer than zero",
        f"{rules}:7:46: an in_purchase action is answered in the purchase and never "
        "expires: max_age does not apply",
        "3 errors; nothing was loaded"]
    rules.write_text(rules.read_text().replace("in_purchase, max_age: 2d", "in_purchase")
                     .replace("soon", "2d").replace("0d", "36h"), encoding="utf-8")
    assert invoke("check", rules).exit_code == 0
    from retention.rules import load_rules
    actions = load_rules(rules).actions
    assert (actions["call_customer"].max_age, actions["flag_in_crm"].max_age,
            actions["discount_now"].max_age) == (2 * 86400, 36 * 3600, None)


def test_max_age_on_the_command_line_is_a_duration(shop, rules):
    db = shop(customer_events(["c-1"], CANCEL))
    for wrong in ("soon", "0d", "-1d"):
        result = invoke("deliver", "--db", db, "--rules", rules, "--max-age", wrong)
        assert result.exit_code == 2, result.output
        assert "Invalid value for '--max-age'" in result.stderr
    assert statuses(db) == {"pending": 1}


# -- 9. the log sink on standard output, and errors said once per kind ------------------------

def test_the_log_sink_without_a_path_writes_each_decision_to_standard_output(shop, rules):
    db = shop(customer_events(["c-1", "c-2"], ("complaint", {})))
    result = invoke("deliver", "--db", db, "--rules", rules, "--route", "crm_task=log",
                    "--route", "crm_tag=log")
    assert result.exit_code == 0, result.output
    *lines, summary = result.stdout.splitlines()
    assert summary == "sent 4, failed 0"
    written = [json.loads(line) for line in lines]
    assert [w["type"] for w in written] == ["retention.decision"] * 4
    assert {w["data"]["id"] for w in written} == set(outbox(db))
    assert statuses(db) == {"sent": 4}


def test_deliver_says_each_kind_of_sink_error_once(shop, rules, smtp, receiver):
    # two customers without an address, two webhooks answered 500: two kinds of error
    db = shop([*customer_events(["nomail-1", "nomail-2"], ("billing_error", {})),
               *customer_events(["c-1", "c-2"], CANCEL, start=10)])
    receiver.status = 500
    emails = sorted(did for did, *_ in query(db, "SELECT id FROM decisions WHERE via = 'email'"
                                                 " ORDER BY ts, id"))
    hooks = [did for (did,) in query(db, "SELECT id FROM decisions WHERE via = 'webhook'"
                                         " ORDER BY ts, id")]
    result = invoke("deliver", "--db", db, "--rules", rules, *sets(email_settings(smtp)),
                    *sets(webhook_settings(receiver)))
    assert result.exit_code == 2, result.output
    assert sorted(result.stderr.splitlines()) == sorted([
        f"failed: {receiver.url} answered 500 Internal Server Error "
        f"(2 decisions, first {hooks[0]})",
        "failed: no email address for customer <customer>: link one with an identify event "
        f'("aliases": ["email:..."]) (2 decisions, first {min(emails, key=emails.index)})'])
    assert one_line(result.stdout).startswith("sent 0, failed 4")
    # each decision keeps its own reason
    assert {r for (r,) in query(db, "SELECT reason FROM decisions WHERE via = 'email'")} == {
        'no email address for customer nomail-1: link one with an identify event ("aliases":'
        ' ["email:..."])',
        'no email address for customer nomail-2: link one with an identify event ("aliases":'
        ' ["email:..."])'}


def test_deliver_prints_at_most_ten_kinds_of_error_and_counts_the_rest(shop, rules):
    from retention.delivery import DeliveryError
    from retention.hookspecs import hookimpl

    class Picky:
        def __init__(self, settings):
            self.n = 0

        def deliver(self, delivery):
            self.n += 1
            raise DeliveryError(f"refusal number {self.n}", permanent=True)

    class Plugin:
        @hookimpl
        def register_sinks(self, register):
            register("picky", Picky)

    db = shop(customer_events([f"c-{n}" for n in range(12)], ("complaint", {})))
    plugin = Plugin()
    plugins.pm.register(plugin, name="picky")
    try:
        result = invoke("deliver", "--db", db, "--rules", rules, "--route", "crm_task=picky")
    finally:
        plugins.pm.unregister(plugin)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 11
    assert all(line.startswith("failed: refusal number ") for line in lines[:10])
    assert lines[10] == ("failed: 2 more decisions, 2 other kinds of error: "
                         "retention decisions --status failed")


def test_the_servers_delivery_loop_logs_what_keeps_decisions_from_going(
        shop, rules, receiver, caplog):
    import asyncio
    import logging

    from retention.server import ServerConfig, create_app

    # email has no host: it cannot work; the webhook answers 500
    db = shop([*customer_events(["ann@example.com"], REVIEW),
               *customer_events(["c-1", "c-2"], CANCEL, start=5)])
    receiver.status = 500
    values = dict(s.split("=", 1) for s in webhook_settings(receiver))
    service = create_app(ServerConfig(db=db, settings=Settings(values, environ={}),
                                      deliver_every=0.01, templates=rules / "templates",
                                      routes={"crm_task": "log", "crm_tag": "log"},
                                      max_age=30 * 86400.0)).state.retention

    def said(text):
        return [r for r in caplog.records if text in r.getMessage()]

    async def serve_a_while():
        await service.start()
        try:
            deadline = time.monotonic() + 10
            while len(receiver.hits) < 2 or not said("cannot work"):
                assert time.monotonic() < deadline, caplog.text
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # some thirty runs more: nothing new to say
        finally:
            await service.stop()

    with caplog.at_level(logging.WARNING, logger="retention.server"):
        asyncio.run(serve_a_while())
    [unavailable] = said("cannot work")
    assert unavailable.getMessage() == (
        "delivery: a sink cannot work: email: set RETENTION_EMAIL_HOST "
        "(or --set email.host=...); its decisions wait")
    [failed] = said("failed")
    assert failed.levelname == "WARNING"
    assert failed.getMessage().startswith(
        f"delivery: 2 failed: {receiver.url} answered 500 Internal Server Error (first: ")
    assert statuses(db, "email") == {"pending": 1}


def test_retention_serve_passes_max_age_to_its_delivery_loop(shop, rules, tmp_path):
    import socket

    db = shop(dated_events([("old", 3), ("recent", 1)]))
    log = tmp_path / "deliveries.jsonl"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETENTION_")}
    process = subprocess.Popen(
        [str(RETENTION), "serve", "--db", str(db), "--rules", str(rules), "--port", str(port),
         "--deliver-every", "0.05", "--max-age", "2d", "--route", "crm_task=log",
         "--route", "crm_tag=log", "--set", f"log.path={log}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while statuses(db).get("pending"):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"still pending after 20 s: {statuses(db)}"
            time.sleep(0.05)
    finally:
        process.terminate()
        process.communicate(timeout=15)
    assert set(query(db, "SELECT customer, status FROM decisions")) == {
        ("old", "expired"), ("recent", "sent")}
    assert {json.loads(line)["data"]["customer"] for line in log.read_text().splitlines()
            } == {"recent"}
