"""docs/adapters.md, "Sending email through SendGrid, Postmark or Mandrill": the
``email`` sink with each relay's documented settings (STARTTLS on 587, the login the
relay asks for) and the relay's own headers written in the template, delivered by
`retention deliver` to an SMTP server on loopback that asks for exactly that login."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from retention.cli import cli

from ..servers import SmtpServer, authenticator, self_signed_certificate, server_tls_context

RULES = """\
capital: {initial: 70, min: 0, max: 100, opens_on: [purchase]}
rules:
  review_written: {when: event.type == "review", points: 4, then: [thank_contributor]}
actions:
  thank_contributor: {kind: marketing, via: email, template: thanks}
"""
#: (relay, its SMTP login and password as its docs give them, the template's headers)
RELAYS = [
    ("sendgrid", "apikey", "SG.an-api-key",
     ['X-SMTPAPI: {"category": ["thanks"]}']),
    ("postmark", "a-server-token", "a-server-token",
     ["X-PM-Message-Stream: broadcast", "X-PM-Tag: thanks"]),
    ("mandrill", "care@shop.example", "a-mandrill-api-key", ["X-MC-Tags: thanks"]),
]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    made = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    if made is None:
        pytest.skip("no way to make a self-signed certificate for STARTTLS")
    return made


@pytest.mark.parametrize(("relay", "username", "password", "headers"), RELAYS,
                         ids=[r[0] for r in RELAYS])
def test_the_email_sink_sends_through_each_relay_as_documented(
        tmp_path, monkeypatch, certificate, relay, username, password, headers):
    for name in ("RETENTION_EMAIL_HOST", "RETENTION_EMAIL_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "rules"
    (folder / "templates").mkdir(parents=True)
    (folder / "shop.yaml").write_text(RULES, encoding="utf-8")
    (folder / "templates" / "thanks.txt").write_text(
        "Subject: Thank you\n" + "".join(h + "\n" for h in headers)
        + "\nThank you for your review.\n", encoding="utf-8")
    day = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(e) + "\n" for e in [
        {"id": "p1", "customer": "email:ann@example.com", "type": "purchase",
         "at": day.isoformat(), "amount": 30},
        {"id": "r1", "customer": "email:ann@example.com", "type": "review",
         "at": (day + timedelta(hours=1)).isoformat(), "rating": 5}]), encoding="utf-8")
    db = tmp_path / "shop.db"
    runner = CliRunner()
    ingested = runner.invoke(cli, ["ingest", "--db", str(db), "--rules", str(folder),
                                   str(events)])
    assert ingested.exit_code == 0, ingested.output

    cert, key = certificate
    server = SmtpServer(tls_context=server_tls_context(cert, key), require_starttls=True,
                        authenticator=authenticator(username, password),
                        auth_require_tls=True).start()
    try:
        # the documented settings; only the host is loopback (and its certificate ours)
        settings = {"host": "127.0.0.1", "port": server.port, "starttls": "true",
                    "username": username, "password": password, "cafile": cert,
                    "from": "Shop <care@shop.example>",
                    "unsubscribe_url": "https://shop.example/u/${customer}"}
        result = runner.invoke(cli, ["deliver", "--db", str(db), "--rules", str(folder),
                                     *[a for k, v in settings.items()
                                       for a in ("--set", f"email.{k}={v}")]])
    finally:
        server.stop()
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "sent 1, failed 0"
    [received] = server.mailbox.received
    assert (received.tls, received.authenticated, received.login) == (True, True, username)
    assert received.rcpt_tos == ["ann@example.com"]
    for header in headers:
        name, _, value = header.partition(": ")
        assert received.message[name] == value
