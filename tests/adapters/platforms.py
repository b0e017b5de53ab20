"""A platform's API on loopback, for the sinks' tests and the sources' lookups: a
ThreadingHTTPServer on 127.0.0.1 whose ``routes`` answer each request as the
platform documents, and which keeps every request, with what was wrong with it
(``problems``: a test asserts there are none).

``api.script(status, headers)`` makes the next request answered that way whatever it
asks (a 429 with ``Retry-After``, a 503), before the routes answer again.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit


class Call(NamedTuple):
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any  # the JSON sent, or None
    status: int  # what the API answered


class Answer(NamedTuple):
    status: int
    body: Any = None
    headers: dict[str, str] | None = None


#: a route: (method, path pattern) -> handler(call, match) -> Answer
Route = tuple[str, str, Callable[[Call, re.Match[str]], Answer]]


class PlatformApi:
    def __init__(self, routes: list[Route], auth: str):
        self.routes = [(m, re.compile(p), h) for m, p, h in routes]
        self.auth = auth
        self.calls: list[Call] = []
        self.problems: list[str] = []
        self.scripted: list[Answer] = []
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                parts = urlsplit(self.path)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                call = Call(self.command, parts.path, parse_qs(parts.query), headers,
                            body, 0)
                answer = api.answer(call, raw)
                with api.lock:
                    api.calls.append(call._replace(status=answer.status))
                payload = json.dumps(answer.body).encode() if answer.body is not None else b""
                self.send_response(answer.status)
                for name, value in (answer.headers or {}).items():
                    self.send_header(name, value)
                self.send_header("content-type", "application/json; charset=utf-8")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.scripted.append(Answer(status, {"error": "scripted"}, headers or {}))

    def problem(self, call: Call, text: str) -> Answer:
        with self.lock:
            self.problems.append(f"{call.method} {call.path}: {text}")
        return Answer(400, {"status": "error", "message": text})

    def answer(self, call: Call, raw: bytes) -> Answer:
        if call.headers.get("authorization") != self.auth:
            return Answer(401, {"status": "error", "message": "authentication failed"})
        with self.lock:
            if self.scripted:
                return self.scripted.pop(0)
        if raw and not call.headers.get("content-type", "").startswith("application/json"):
            return self.problem(call, "a body that is not sent as application/json")
        for method, pattern, handler in self.routes:
            match = pattern.fullmatch(call.path)
            if match and method == call.method:
                try:
                    return handler(call, match)
                except (AssertionError, KeyError, TypeError, IndexError) as exc:
                    return self.problem(call, f"not the documented request: {exc!r}")
        return self.problem(call, "no such endpoint")

    def made(self, method: str, path: str) -> list[Call]:
        """The calls of that method to that path (as a regular expression) that the
        routes answered with a 2xx."""
        return [c for c in self.calls if c.method == method and re.fullmatch(path, c.path)
                and 200 <= c.status < 300]

    def start(self) -> PlatformApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
