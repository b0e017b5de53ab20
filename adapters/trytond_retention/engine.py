"""Where the engine is, as the ``[retention]`` section of trytond.conf says.

Embedded (``db``, with ``rules`` for a new database): a ``retention.store.StoredEngine``
on that SQLite file, inside the Tryton process, one per thread (a SQLite connection
belongs to its thread; Tryton serves requests on several).

Remote (``url``, with ``token`` and ``secret`` as the server has them): ``retention
serve`` at that address; events go to ``POST {url}/events`` (a bearer token when
``token`` is set, Standard Webhooks signatures when ``secret`` is), customers are read
from ``GET {url}/customers/{id}``.

Each key can also come from the environment, as every trytond setting can:
``TRYTOND_RETENTION__DB``, ``TRYTOND_RETENTION__URL``...
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.parse
from datetime import datetime
from typing import Any

from trytond import config

from retention import RetentionError, http, signing
from retention.delivery import DeliveryError
from retention.store import StoredEngine, UnknownCustomer

SECTION = "retention"
#: seconds a request to a remote engine may take: a party form waits for it
TIMEOUT = 5.0


class NotConfigured(RetentionError):
    """trytond.conf has no ``[retention]`` ``db`` nor ``url``."""


def setting(key: str, default: str | None = None) -> str | None:
    value = config.get(SECTION, key, default=default)
    return value if value not in (None, "") else default


def remote() -> bool:
    """Whether the engine is a ``retention serve`` elsewhere (``url``) rather than
    embedded (``db``)."""
    if setting("url"):
        return True
    if setting("db"):
        return False
    raise NotConfigured("trytond.conf: set [retention] db (the engine embedded) "
                        "or url (a retention server)")


_local = threading.local()


def embedded() -> StoredEngine:
    """This thread's engine on ``[retention] db`` (with ``rules`` when the file is
    new, or to change the rules it runs)."""
    path, rules = setting("db"), setting("rules")
    if path is None:
        raise NotConfigured("trytond.conf: [retention] db is not set")
    engines = getattr(_local, "engines", None)
    if engines is None:
        engines = _local.engines = {}
    engine = engines.get((path, rules))
    if engine is None:
        engine = engines[(path, rules)] = StoredEngine(path, rules)
    return engine


def close() -> None:
    """Close this thread's embedded engines (tests, and a worker that stops)."""
    for engine in getattr(_local, "engines", {}).values():
        engine.close()
    _local.engines = {}


def post(events: list[dict[str, Any]]) -> None:
    """Hand events to the engine. Raises DeliveryError when it cannot take them now
    (they are tried again); an event the engine refuses is its dead letter, not ours."""
    if not events:
        return
    if not remote():
        embedded().ingest(events, source="tryton")
        return
    body = json.dumps(events, separators=(",", ":")).encode()
    headers = {"content-type": "application/json"}
    if token := setting("token"):
        headers["authorization"] = f"Bearer {token}"
    if secret := setting("secret"):
        headers.update(signing.sign(secret, "msg_" + secrets.token_hex(12),
                                    int(time.time()), body))
    # 422: some events refused, kept as dead letters by the server, the others stored
    http.request("POST", _url("/events"), headers=headers, body=body, timeout=TIMEOUT,
                 accept=(422,))


def profile(customer: str, at: datetime) -> dict[str, Any] | None:
    """The customer at ``at`` as ``retention customer ID --at`` shows them (capital,
    level, ledger), or None when the engine does not know them."""
    if not remote():
        try:
            return embedded().profile(customer, at)
        except UnknownCustomer:
            return None
    path = "/customers/" + urllib.parse.quote(customer, safe="") + "?" + \
        urllib.parse.urlencode({"at": at.isoformat()})
    headers = {"authorization": f"Bearer {token}"} if (token := setting("token")) else {}
    try:
        answer = http.request("GET", _url(path), headers=headers, timeout=TIMEOUT,
                              accept=(404,))
    except DeliveryError as exc:
        raise RetentionError(f"retention server: {exc}") from None
    return None if answer.status == 404 else answer.json()


def at_risk(at: datetime) -> list[dict[str, Any]]:
    """The customers at risk at ``at``, most urgent (lowest capital) first, each with
    every identifier they have (``identifiers``). Embedded engine only: a remote one
    has no such endpoint (run ``retention at-risk`` there)."""
    if remote():
        raise RetentionError("the parties at risk need the embedded engine "
                             "([retention] db): run `retention at-risk` on the server")
    engine = embedded()
    return [{**row, "identifiers": engine.identifiers(row["customer"])}
            for row in engine.at_risk(now=at)]


def _url(path: str) -> str:
    base = setting("url")
    assert base is not None
    return base.rstrip("/") + path
