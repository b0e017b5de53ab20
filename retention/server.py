"""The webhook server: an ASGI app (Starlette) over a stored engine.

``create_app(config)`` returns the app; ``retention serve`` runs it under uvicorn, and
a host can mount it in its own ASGI app (it starts itself on the first request when
its lifespan is not run). Endpoints:

- ``POST /events``: canonical events (a JSON object or array) or CloudEvents
  (structured, batched or binary mode), signed the Standard Webhooks way when a
  secret is configured;
- ``POST /hooks/{source}``: the raw body goes to the event-source plugin ``source``,
  which checks its signature and turns it into events;
- ``GET /customers/{id}``: capital, level and the explained ledger;
- ``GET /health``: for load balancers, never behind the token.

Every write goes through one thread that owns the database connection. Requests
that arrive while a transaction runs are committed together in the next one (group
commit): each request still gets its own counts, and a failed transaction fails
every request in it, with nothing stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import plugins, signing, webevents
from .delivery import Deliverer, SettingError, Settings
from .errors import RetentionError
from .store import Incoming, StoredEngine, UnknownCustomer
from .times import TimeFormatError, parse_instant

logger = logging.getLogger("retention.server")


@attrs.frozen(kw_only=True)
class ServerConfig:
    """What the server needs: the database and its options (see ``retention serve``)."""

    db: Path
    #: bearer token required by every endpoint but /health (None: no token)
    token: str | None = None
    #: sink and source settings; ``standard.secret`` signs POST /events
    settings: Settings = attrs.field(factory=Settings)
    max_body: int = 1 << 20
    #: seconds between delivery runs; 0 delivers nothing in this process
    deliver_every: float = 5.0
    routes: Mapping[str, str] = attrs.field(factory=dict)
    templates: Path | None = None
    max_attempts: int = 8
    backoff: float = 30.0
    #: seconds after which an undelivered decision expires, unless its action says
    max_age: float = 7 * 86400.0
    #: most events committed in one transaction
    max_group: int = 2000
    #: most events one body may hold (more: the body is refused whole, one dead letter)
    max_events: int = 10_000
    #: seconds a request's whole body may take to arrive (408 after)
    body_timeout: float = 30.0
    clock: Callable[[], float] = time.time


class _TooLarge(Exception):
    pass


@attrs.define
class _Pending:
    items: list[Incoming]
    source: str
    future: asyncio.Future[Any]
    #: the signed message that carried them (recorded with them), if any
    key: bytes | None = None


class RetentionService:
    """The server's state: the writer thread, the delivery loop and the app."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.app = Starlette(routes=[
            Route("/events", self.post_events, methods=["POST"]),
            Route("/hooks/{source}", self.post_hook, methods=["POST"]),
            # platforms check an endpoint exists before they send to it (Mandrill)
            Route("/hooks/{source}", self.head_hook, methods=["HEAD"]),
            # a customer id may hold slashes (gid://shop/Customer/7)
            Route("/customers/{customer:path}", self.get_customer, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ], lifespan=self._lifespan)
        self.app.state.retention = self
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="retention-db")
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="retention-deliver")
        self._store: StoredEngine | None = None
        self._deliverer: Deliverer | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._sources: dict[str, Any] = {}
        self._replays = _Replays()
        self.secret = config.settings.get("standard", "secret")
        if self.secret:
            signing.key_of(self.secret)

    # -- life --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> Any:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            loop = asyncio.get_running_loop()
            self._store = await loop.run_in_executor(
                self._writer, lambda: StoredEngine(self.config.db, None))
            self._queue = asyncio.Queue()
            self._wake = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._write_loop()))
            if self.config.deliver_every > 0:
                self._tasks.append(asyncio.create_task(self._deliver_loop()))
            self._started = True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        loop = asyncio.get_running_loop()
        if self._deliverer is not None:
            deliverer, self._deliverer = self._deliverer, None
            await loop.run_in_executor(self._sender, _close_deliverer, deliverer)
        if self._store is not None:
            store, self._store = self._store, None
            await loop.run_in_executor(self._writer, store.close)
        self._started = False

    # -- the writer: one thread, one connection, group commits -------------------------

    async def _write_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            group = [await self._queue.get()]
            size = len(group[0].items)
            while size < self.config.max_group and not self._queue.empty():
                nxt = self._queue.get_nowait()
                group.append(nxt)
                size += len(nxt.items)
            try:
                results = await loop.run_in_executor(self._writer, self._commit, group)
            except Exception as exc:
                if isinstance(exc, RetentionError) or len(group) == 1:
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(exc)
                    continue
                # something in one request broke the transaction: each request alone,
                # so only the culprit fails
                results = []
                for pending in group:
                    try:
                        results.extend(await loop.run_in_executor(
                            self._writer, self._commit, [pending]))
                    except Exception as alone:
                        pending.future.set_exception(alone)
                        results.append([])
            decided = False
            for pending, result in zip(group, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
                decided = decided or any(
                    status == "new" and detail.decisions for status, detail in result)
            if decided and self._wake is not None:
                self._wake.set()

    def _commit(self, group: list[_Pending]) -> list[list[tuple[str, Any]]]:
        """In the writer thread: the group's items in one transaction."""
        assert self._store is not None
        items: list[Incoming] = []
        for pending in group:
            if pending.source:
                items.extend(_with_source(item, pending.source) for item in pending.items)
            else:
                items.extend(pending.items)
        until = self.config.clock() + self._replays.keep
        _, results = self._store.ingest_batch(
            items, messages=[(p.key, until) for p in group if p.key is not None])
        out, start = [], 0
        for pending in group:
            out.append(results[start:start + len(pending.items)])
            start += len(pending.items)
        return out

    async def _submit(self, items: list[Incoming], source: str = "",
                      key: bytes | None = None) -> list[tuple[str, Any]]:
        await self.start()
        assert self._queue is not None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(items=items, source=source, future=future, key=key))
        return await future

    async def _read(self, function: Callable[[StoredEngine], Any]) -> Any:
        await self.start()
        store = self._store
        assert store is not None
        return await asyncio.get_running_loop().run_in_executor(
            self._writer, function, store)

    # -- delivery ----------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        warned = ""
        unavailable_said: dict[str, str] = {}
        while True:
            try:
                report = await loop.run_in_executor(self._sender, self._deliver_once)
                _log_delivery(report, unavailable_said)
                warned = ""
            except (SettingError, RetentionError) as exc:
                if str(exc) != warned:  # said once, not at every run
                    logger.error("delivery stopped: %s", exc)
                    warned = str(exc)
            except Exception:
                logger.exception("delivery run failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.deliver_every)

    def _deliver_once(self) -> Any:
        """In the delivery thread, with its own connection: one delivery run."""
        if self._deliverer is None:
            c = self.config
            self._deliverer = Deliverer(
                StoredEngine(c.db, None), plugins.sinks(), settings=c.settings,
                routes=c.routes, templates=c.templates, max_attempts=c.max_attempts,
                base_backoff=c.backoff, max_age=c.max_age, clock=c.clock)
        return self._deliverer.run()

    # -- HTTP --------------------------------------------------------------------------

    def _refused(self, request: Request) -> JSONResponse | None:
        token = self.config.token
        if not token:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              token.encode()):
            return None
        return JSONResponse({"error": "a bearer token is required"}, status_code=401,
                            headers={"www-authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        """The whole body, within ``max_body`` bytes and ``body_timeout`` seconds."""
        limit = self.config.max_body
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _TooLarge
        chunks, size = [], 0
        # one deadline for the whole body: a client sending a byte now and then cannot
        # hold the request open
        async with asyncio.timeout(self.config.body_timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _TooLarge
                chunks.append(chunk)
        return b"".join(chunks)

    async def _receive(self, request: Request, origin: str, source: str,
                       verify: Callable[[bytes, Mapping[str, str]], None] | None,
                       parse: Callable[[bytes, Mapping[str, str]], list[Any]]
                       ) -> Response:
        """The body of an authorized request, checked, parsed and stored."""
        try:
            body = await self._body(request)
        except _TooLarge:
            return JSONResponse({"error": f"the body is over {self.config.max_body} bytes"},
                                status_code=413)
        except TimeoutError:
            return JSONResponse(
                {"error": f"the body did not arrive within {self.config.body_timeout:g} s"},
                status_code=408, headers={"connection": "close"})
        except ClientDisconnect:  # nobody to answer; nothing was stored
            return Response(status_code=400)
        headers = {k.lower(): v for k, v in request.headers.items()}
        if verify is None:
            return (await self._take(body, headers, origin, source, parse))[0]
        try:
            verify(body, headers)  # on the raw bytes, before any parsing
        except signing.SignatureError as exc:
            return JSONResponse({"error": str(exc)}, status_code=401)
        except Exception as exc:  # a source plugin's bug: nothing is let through
            logger.exception("%s: the signature check failed", origin)
            return JSONResponse({"error": f"the signature check failed: "
                                          f"{type(exc).__name__}"}, status_code=500)
        key = signing.message_key(body, headers)
        if key is None:
            return (await self._take(body, headers, origin, source, parse))[0]
        # a signed message is used once, whatever its unsigned parts (the ce-* headers
        # of a binary CloudEvent) say: claimed before the first await, so no two
        # requests can both find it new
        now = self.config.clock()
        used = self._replays.claim(key, now)
        if used is not None:
            return _replayed(headers["webhook-id"], used)
        stored = False
        try:
            # stored before this process started (the database remembers it)
            if await self._read(lambda store: store.message_stored(key, now)):
                stored = True
                return _replayed(headers["webhook-id"], "stored")
            response, stored = await self._take(body, headers, origin, source, parse, key)
            return response
        finally:
            if stored:
                self._replays.settle(key, self.config.clock())
            else:  # a sender's retry of a message that was not stored is processed
                self._replays.release(key)

    async def _take(self, body: bytes, headers: Mapping[str, str], origin: str, source: str,
                    parse: Callable[[bytes, Mapping[str, str]], list[Any]],
                    key: bytes | None = None) -> tuple[JSONResponse, bool]:
        """The events of a verified body, stored; the answer, and whether anything was
        stored (the events, or the body as a dead letter)."""
        try:
            # a source may call its host's API (a lookup): not on the event loop
            raws = await asyncio.get_running_loop().run_in_executor(None, parse, body,
                                                                    headers)
            if not isinstance(raws, list):
                raise webevents.BodyError(f"the source gave {type(raws).__name__}, "
                                          "not a list of events")
            ignored = sum(isinstance(raw, webevents.Ignored) for raw in raws)
            if ignored:
                raws = [raw for raw in raws if not isinstance(raw, webevents.Ignored)]
            if len(raws) > self.config.max_events:  # (each bad one would be a dead letter)
                raise webevents.BodyError(
                    f"the body holds {len(raws):,} events, more than {self.config.max_events:,}"
                    ": send them in several requests")
        except Exception as exc:  # the body is kept as a dead letter with the reason
            ignored = 0
            reason = str(exc) if isinstance(exc, RetentionError) else \
                f"{type(exc).__name__}: {exc}"
            text = body.decode("utf-8", errors="replace")
            later = isinstance(exc, webevents.Unavailable) and bool(source)
            # a body its source can use later goes back to it on a retry
            items = [Incoming(raw=webevents.BodyError(reason), origin=origin, text=text,
                              retriable=later, resend_to=source if later else None)]
            refused = JSONResponse({"error": reason, "dead_lettered": 1},
                                   status_code=503 if later else 400)
        else:
            items = [Incoming(raw=raw, origin=origin, line=n if len(raws) > 1 else None)
                     for n, raw in enumerate(raws, 1)]
            refused = None
        if not items:  # only what the source ignores: nothing to store
            return _answer([], ignored), False
        try:
            results = await self._submit(items, source, key)
        except RetentionError as exc:
            return JSONResponse({"error": f"not stored: {exc}"}, status_code=503), False
        except Exception as exc:
            logger.exception("%s: the events could not be stored", origin)
            return JSONResponse({"error": f"not stored: {type(exc).__name__}"},
                                status_code=500), False
        return (refused or _answer(results, ignored)), True

    async def post_events(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        verify = None
        if self.secret:
            secret = self.secret

            def verify(body: bytes, headers: Mapping[str, str]) -> None:
                signing.verify(secret, body, headers, now=self.config.clock())

        return await self._receive(request, "POST /events", "", verify, webevents.events_of)

    async def post_hook(self, request: Request) -> Response:
        name = request.path_params["source"]
        refused = self._refused(request)
        if refused is not None:
            return refused
        source = self._sources.get(name)
        if source is None:
            factory = plugins.sources().get(name)
            if factory is None:
                return JSONResponse({"error": f"no event source named {name!r}"},
                                    status_code=404)
            try:
                source = self._sources[name] = factory(self.config.settings)
            except SettingError as exc:
                return JSONResponse({"error": str(exc)}, status_code=503)
            except Exception as exc:
                logger.exception("event source %s cannot start", name)
                return JSONResponse({"error": f"event source {name!r} cannot start: "
                                              f"{type(exc).__name__}"}, status_code=503)
        return await self._receive(request, f"POST /hooks/{name}", name, source.verify,
                                   source.parse)

    async def head_hook(self, request: Request) -> Response:
        """200 when an event source of that name is loaded, 404 otherwise; nothing is
        read or started."""
        refused = self._refused(request)
        if refused is not None:
            return Response(status_code=401, headers={"www-authenticate": "Bearer"})
        known = request.path_params["source"] in plugins.sources()
        return Response(status_code=200 if known else 404)

    async def get_customer(self, request: Request) -> JSONResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        customer = request.path_params["customer"]
        given = request.query_params.get("at")
        try:
            at = parse_instant(given) if given else datetime.fromtimestamp(
                self.config.clock(), UTC).replace(microsecond=0)
        except TimeFormatError as exc:  # a ValueError, not a RetentionError
            return JSONResponse({"error": f"at: {exc}"}, status_code=400)
        try:
            info = await self._read(lambda store: store.profile(customer, at))
        except UnknownCustomer as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except RetentionError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(info)

    async def health(self, request: Request) -> JSONResponse:
        try:
            await self._read(lambda store: store.db.execute("SELECT 1").fetchone())
        except Exception as exc:
            logger.error("health: %s", exc)  # the details stay in the log
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})


class _Replays:
    """Signed messages in flight or already stored (by ``signing.message_key``), a
    stored one kept as long as its signature could still be accepted (the signed
    timestamp's tolerance, both ways).

    Only the event loop's thread calls it, and ``claim`` does not await: checking and
    claiming are one step."""

    def __init__(self, keep: float = 2 * signing.TOLERANCE, most: int = 1_000_000):
        self.keep = keep
        self.most = most
        self._stored: OrderedDict[bytes, float] = OrderedDict()
        self._in_flight: set[bytes] = set()

    def claim(self, key: bytes, now: float) -> str | None:
        """None, and the message is now in flight; or why it cannot be used again:
        ``"stored"`` or ``"in flight"``."""
        while self._stored and (next(iter(self._stored.values())) < now - self.keep
                                or len(self._stored) > self.most):
            self._stored.popitem(last=False)
        if key in self._stored:
            return "stored"
        if key in self._in_flight:
            return "in flight"
        self._in_flight.add(key)
        return None

    def settle(self, key: bytes, now: float) -> None:
        """The message was stored: used, for good."""
        self._in_flight.discard(key)
        self._stored[key] = now
        self._stored.move_to_end(key)

    def release(self, key: bytes) -> None:
        """Nothing was stored: the message may come again."""
        self._in_flight.discard(key)


def _replayed(msg_id: str, used: str) -> JSONResponse:
    """The answer to a signed message already used: 200 once it is stored (the
    sender's retry gets its success, and nothing changes), 409 while another request
    stores it (that one's answer says whether it was)."""
    if used == "stored":
        return JSONResponse({"new": 0, "duplicates": 0, "identified": 0,
                             "dead_lettered": 0, "decisions": [], "replayed": True})
    return JSONResponse({"error": f"message {msg_id} is being stored by another request; "
                                  "send it again once that one is answered",
                         "replayed": True}, status_code=409)


def _with_source(item: Incoming, source: str) -> Incoming:
    raw = item.raw
    if isinstance(raw, Mapping) and not raw.get("source"):
        return attrs.evolve(item, raw={**raw, "source": source})
    return item


def _answer(results: list[tuple[str, Any]], ignored: int = 0) -> JSONResponse:
    """Counts, the decisions the new events made (recognition rewards for the cart
    among them) and the reasons of what was dead-lettered: 200 when every event was
    used, 422 when some were dead-lettered (the others are stored). ``ignored``:
    notifications the source does not map, counted when there were any."""
    counts = {"new": 0, "duplicates": 0, "identified": 0, "dead_lettered": 0}
    if ignored:
        counts["ignored"] = ignored
    decisions, errors = [], []
    for status, detail in results:
        if status == "new":
            counts["new"] += 1
            decisions.extend(d.to_dict() for d in detail.decisions)
        elif status == "duplicate":
            counts["duplicates"] += 1
        elif status == "identified":
            counts["identified"] += 1
        else:
            counts["dead_lettered"] += 1
            errors.append(detail)
    body: dict[str, Any] = {**counts, "decisions": decisions}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=422 if errors else 200)


def _log_delivery(report: Any, unavailable_said: dict[str, str]) -> None:
    """Log what a delivery run met: each kind of failure and each sink set aside (the
    tries were spent in this run), and a sink that cannot work (a setting missing or
    refused) when that begins or its reason changes, not at every run while it lasts:
    ``unavailable_said`` remembers what was said."""
    for message, (count, first) in report.failures.items():
        logger.warning("delivery: %d failed: %s (first: %s)", count, message, first)
    for reason in report.paused.values():
        logger.warning("delivery: paused: %s", reason)
    if report.expired:
        logger.warning("delivery: %d expired, not sent: older than their max_age",
                       report.expired)
    for name, reason in report.unavailable.items():
        if unavailable_said.get(name) != reason:
            logger.warning("delivery: a sink cannot work: %s; its decisions wait", reason)
    for name in set(unavailable_said) - set(report.unavailable):
        logger.info("delivery: sink %s works again", name)
    unavailable_said.clear()
    unavailable_said.update(report.unavailable)


def _close_deliverer(deliverer: Deliverer) -> None:
    deliverer.close()
    deliverer.store.close()


def create_app(config: ServerConfig) -> Starlette:
    """The ASGI app of ``config``; ``app.state.retention`` is its RetentionService."""
    return RetentionService(config).app
