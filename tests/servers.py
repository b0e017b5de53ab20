"""Real servers on 127.0.0.1 for the tests: an SMTP server (aiosmtpd) that keeps what
it accepted, an HTTP server that keeps what was POSTed to it, a self-signed
certificate for STARTTLS, and ``retention serve`` as a process.

Nothing here is a mock: the sinks talk to these servers through smtplib and urllib
over loopback sockets, and a test reads what arrived.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

# -- SMTP --------------------------------------------------------------------------------


@attrs.define
class Received:
    """One message the SMTP server accepted, and how the session that sent it was."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    authenticated: bool
    login: str | None

    @property
    def decision(self) -> str:
        return self.message["X-Retention-Decision"]


class Mailbox:
    """An aiosmtpd handler that keeps every message it accepts.

    ``reply``, when set, is answered to DATA instead of accepting the message (a
    ``421 ...`` says try later, a ``550 ...`` refuses for good). ``hold_at`` makes
    the n-th message (1-based) wait, unanswered, until the server stops: ``holding``
    is set when that happens, so a test knows a sender is mid-delivery.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.reply: str | None = None
        self.hold_at: int | None = None
        self.holding = threading.Event()
        self.seen = 0
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.seen += 1
            seen = self.seen
        if self.hold_at is not None and seen == self.hold_at:
            self.holding.set()
            await asyncio.Event().wait()  # until the server's tasks are cancelled
        if self.reply is not None:
            return self.reply
        auth = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        message = message_from_bytes(envelope.original_content or envelope.content,
                                     policy=policy.default)
        with self._lock:
            self.received.append(Received(
                mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos),
                message=message, tls=session.ssl is not None,
                authenticated=bool(session.authenticated), login=login))
        return "250 OK: queued"

    def decisions(self) -> list[str]:
        """The X-Retention-Decision of every accepted message, in arrival order."""
        return [r.decision for r in self.received]

    def to(self, address: str) -> list[Received]:
        return [r for r in self.received if r.rcpt_tos == [address]]


class _LoopbackController(Controller):
    """aiosmtpd's threaded controller, on port 0 (a free port the kernel picks) or
    on a given port (to bring a stopped server back where it was)."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpServer:
    """An SMTP server on 127.0.0.1 that can be stopped and started again on the
    same port, keeping one mailbox."""

    def __init__(self, mailbox: Mailbox | None = None, **smtp: Any):
        self.mailbox = mailbox or Mailbox()
        self.smtp = {"server_hostname": "mx.test", "ready_timeout": 10.0, **smtp}
        self.port = 0
        self._controller: _LoopbackController | None = None

    def start(self) -> SmtpServer:
        assert self._controller is None, "already running"
        controller = _LoopbackController(self.mailbox, hostname="127.0.0.1",
                                         port=self.port, **self.smtp)
        controller.start()  # returns once the server answers: a bounded wait
        self.port = controller.port
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    @property
    def running(self) -> bool:
        return self._controller is not None


def authenticator(login: str, password: str) -> Any:
    """An aiosmtpd authenticator that accepts one login and password."""

    def check(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
              ) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login == login.encode()
              and auth_data.password == password.encode())
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    return check


def self_signed_certificate(folder: Path) -> tuple[Path, Path] | None:
    """A certificate for 127.0.0.1 and localhost and its key, made with the
    ``cryptography`` package if installed, else the ``openssl`` command; None when
    neither is available."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        _with_cryptography(cert, key)
        return cert, key
    except ImportError:
        pass
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30)
    return cert, key


def _with_cryptography(cert_path: Path, key_path: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


# -- HTTP --------------------------------------------------------------------------------


@attrs.define
class Hit:
    """One request the HTTP server got, and the status it answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


class HttpReceiver:
    """A ThreadingHTTPServer on 127.0.0.1 that keeps every request and answers a POST
    with ``status`` (changeable while it runs; a 3xx points to ``/moved``) and a GET
    with 200."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.status = 200
        #: headers added to every answer (a ``Retry-After``)
        self.headers: dict[str, str] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self._answer(receiver.status)

            def do_GET(self) -> None:
                self._answer(200)

            def _answer(self, status: int) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                receiver.hits.append(Hit(
                    method=self.command, path=self.path, body=body, status=status,
                    headers={k.lower(): v for k, v in self.headers.items()}))
                payload = b'{"ok": true}' if status < 300 else b'{"error": "no"}'
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("location", "/moved")
                for name, value in receiver.headers.items():
                    self.send_header(name, value)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/retention"

    def start(self) -> HttpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


# -- retention serve ---------------------------------------------------------------------


class Served:
    """``retention serve`` running as a process: its port (read from the line where it
    says it listens) and what it printed so far, on each stream."""

    def __init__(self, process: subprocess.Popen[str]):
        self.process = process
        self.port = 0
        self.out: list[str] = []
        self.err: list[str] = []
        self._listening = threading.Event()
        self._readers = [threading.Thread(target=self._read, args=(stream, lines),
                                          daemon=True)
                         for stream, lines in ((process.stdout, self.out),
                                               (process.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if line.startswith("retention: listening on http://127.0.0.1:"):
                self.port = int(line.rsplit(":", 1)[1])
                self._listening.set()

    def wait_listening(self, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not self._listening.wait(0.05):
            assert self.process.poll() is None, f"it stopped: {self.err}"
            assert time.monotonic() < deadline, f"not listening after {seconds} s: {self.err}"

    def stop(self) -> int:
        """SIGTERM, then the exit status once both streams are read to their end."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            status = self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait(15)
        for reader in self._readers:
            reader.join(10)
        return status


def retention_serve(db: Path, rules: Path, *options: str) -> Served:
    """``retention serve --port 0`` (a free port) over ``db``, with ``options``, its
    environment free of RETENTION_* variables; listening when this returns."""
    command = Path(sys.executable).parent / "retention"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETENTION_")}
    process = subprocess.Popen(
        [str(command), "serve", "--db", str(db), "--rules", str(rules), "--port", "0",
         *options], cwd=db.parent, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    served = Served(process)
    try:
        served.wait_listening()
    except BaseException:
        served.stop()
        raise
    return served
