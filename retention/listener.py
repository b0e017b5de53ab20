"""Where the server listens: the app under uvicorn on a host and port, the line that
says where, the access log, and the deadlines that drop slow clients.

uvicorn closes a connection left idle after a response (``timeout_keep_alive``), but
sets no deadline on a request's headers or on its body, and reads headers of any
size. ``DeadlineProtocol`` adds those bounds to uvicorn's httptools protocol:

- headers: ``header_timeout`` seconds from the connection's opening (or, on a kept-alive
  connection, from the next byte after a request) to the end of the headers, then
  408 and closed; over ``max_header`` bytes of them, 431 and closed;
- body: the app answers 408 to a request whose body takes more than its
  ``body_timeout`` (``ServerConfig.body_timeout``); a request answered before its
  body ended (a 413, a GET with a body) is closed once that deadline has passed, so
  the rest, sent a byte at a time, cannot hold the connection.

Both are deadlines, not idle timers: a byte now and then does not extend them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import http
import json
import sys
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: the defaults of ``retention serve``
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
KEEP_ALIVE = 5.0
MAX_HEADER = 64 * 1024


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers and body
    and a bound on the size of its headers."""

    def __init__(self, *args: Any, header_timeout: float, body_timeout: float,
                 max_header: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_header = max_header
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = True  # no request, or one whose headers have not all come
        self._header_bytes = 0
        self._tail = b""  # the last bytes of the headers so far: where their end may begin
        self._body_late = False

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._set_deadline(self.header_timeout, self._headers_late)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            # counted before the parser reads them: headers that all arrive in one
            # read are complete (and forgotten) once it has
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            self._header_bytes += len(data) if end < 0 else end + 4 - len(self._tail)
            self._tail = seen[-3:]
            if self._header_bytes > self.max_header:
                self._refuse(431, f"the request's headers are over {self.max_header} bytes")
                return
            if self._deadline is None:
                # a kept-alive connection's next request begins (uvicorn stops its
                # keep-alive timer at any byte, even the blank lines a parser skips)
                self._set_deadline(self.header_timeout, self._headers_late)
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._clear_deadline()
        super().connection_lost(exc)

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a pipelined request, in the previous one's bytes
            self._set_deadline(self.header_timeout, self._headers_late)

    def on_headers_complete(self) -> None:
        self._clear_deadline()
        self._in_headers = False
        super().on_headers_complete()
        self._set_deadline(self.body_timeout, self._body_deadline)

    def on_message_complete(self) -> None:
        self._clear_deadline()
        self._in_headers, self._header_bytes, self._body_late = True, 0, False
        self._tail = b""
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._body_late:  # answered, and the body is still not all here
            self.transport.close()

    # -- the deadlines -----------------------------------------------------------------

    def _set_deadline(self, seconds: float, then: Callable[[], None]) -> None:
        self._clear_deadline()
        self._deadline = self.loop.call_later(seconds, then)

    def _clear_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        self._refuse(408, f"the request's headers did not arrive within "
                          f"{self.header_timeout:g} s")

    def _body_deadline(self) -> None:
        self._deadline = None
        self._body_late = True
        # while the app still reads the body, its own deadline answers 408
        if self.cycle is not None and self.cycle.response_complete:
            self.transport.close()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` to a request that never reached the app, and close."""
        self._clear_deadline()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined request: no answer out of turn
            return
        body = json.dumps({"error": reason}).encode()
        head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode(),
                *(name + b": " + value for name, value in self.server_state.default_headers),
                b"content-type: application/json",
                b"content-length: %d" % len(body), b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()


def logging_config(access_log: bool) -> dict[str, Any]:
    """uvicorn's logging, quieter: its own news only from warnings up, one access line
    per request (unless ``access_log`` is off), and the ``retention`` loggers (the
    delivery loop, the server's errors) on standard error."""
    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["uvicorn.error"]["level"] = "WARNING"
    config["loggers"]["uvicorn.access"]["level"] = "INFO" if access_log else "WARNING"
    config["loggers"]["retention"] = {"handlers": ["default"], "level": "INFO",
                                      "propagate": False}
    return config


class _Server(uvicorn.Server):
    """uvicorn's server, which says where it listens once it does."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[str], None]):
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            self.announce(f"listening on http://{shown}:{port}")


def run(app: Any, *, host: str, port: int, header_timeout: float = HEADER_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT, keep_alive: float = KEEP_ALIVE,
        max_header: int = MAX_HEADER, access_log: bool = True,
        announce: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` until SIGINT or SIGTERM; ``announce`` (default: standard error)
    gets the line that says where it listens. ``body_timeout`` closes connections
    whose request was answered before its body ended; the app's own deadline (the
    same figure, in its ServerConfig) answers the others."""
    if announce is None:
        def announce(line: str) -> None:
            print(f"retention: {line}", file=sys.stderr, flush=True)

    protocol = functools.partial(DeadlineProtocol, header_timeout=header_timeout,
                                 body_timeout=body_timeout, max_header=max_header)
    config = uvicorn.Config(app, host=host, port=port, http=protocol,
                            timeout_keep_alive=keep_alive,
                            log_config=logging_config(access_log), access_log=access_log,
                            lifespan="on")
    server = _Server(config, announce)
    # Ctrl-C: uvicorn shuts down, then raises the signal again, as uvicorn.run expects
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:  # uvicorn said why (the address is taken...)
        sys.exit(1)
