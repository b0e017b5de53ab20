"""datasette-retention: the retention dashboard inside Datasette, where the data is.

``datasette retention.db`` with this plugin installed serves:

- ``/-/retention``: customers by level, the capital distribution (a chart), the
  customers at risk with their live capital (``retention at-risk``'s numbers),
  decisions by action and status, retention forces against pull-away forces.
- ``/-/retention/customers/{id}``: the capital trajectory (a chart), the ledger
  that explains the capital, the decisions with their status, the identifiers
  (``retention customer ID --at``'s numbers).

Every figure is computed by the engine itself (``Engine.open(path,
read_only=True)``: SQLite's read-only mode, so the plugin cannot write), at the
moment ``?at=`` names (ISO-8601 with a zone; default: the clock, as the CLI).
The charts are retention-engine's own (``retention.charts``, matplotlib), served
as SVG.

Permissions (Datasette's own): the pages need ``view-instance`` and
``view-database`` on the retention database. Customer pages and the customer ids
of the at-risk list hold personal data: they need ``retention-view-customers``,
denied unless the plugin configuration allows an actor::

    plugins:
      datasette-retention:
        database: retention            # default: the first retention database
        allow-customers: {id: [alice]}  # Datasette's "allow" block syntax

docs/hosts.md, "Datasette", says more.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, urlencode

from datasette import Forbidden, hookimpl
from datasette.utils import actor_matches_allow
from datasette.utils.asgi import BadRequest, NotFound, Response

from retention import Engine, RetentionError, charts
from retention.models import MAX_NAME
from retention.store import APPLICATION_ID, UnknownCustomer
from retention.times import TimeFormatError, parse_instant

NAME = "datasette-retention"
#: the permission that customer pages (personal data) need
VIEW_CUSTOMERS = "retention-view-customers"
#: at most this many customers at risk listed on the dashboard (lowest capital first)
AT_RISK_LIMIT = 200
#: matplotlib's text layout and font cache are shared by every figure: one drawing at
#: a time (each takes well under a second)
_DRAWING = threading.Lock()


@hookimpl
def register_routes(datasette: Any) -> list[tuple[str, Any]]:
    return [
        (r"^/-/retention$", dashboard),
        (r"^/-/retention/distribution\.svg$", distribution_chart),
        (r"^/-/retention/customers/(?P<customer>[^/]+)/trajectory\.svg$", trajectory_chart),
        (r"^/-/retention/customers/(?P<customer>[^/]+)$", customer_page),
    ]


@hookimpl
def permission_allowed(datasette: Any, actor: Any, action: str, resource: Any) -> bool | None:
    """``retention-view-customers``: the actors the configuration's
    ``allow-customers`` block matches; no answer otherwise (so denied by default,
    and another permission plugin may still grant it)."""
    if action != VIEW_CUSTOMERS:
        return None
    allow = _config(datasette).get("allow-customers")
    if allow is None:
        return None
    return actor_matches_allow(actor, allow)


@hookimpl
def menu_links(datasette: Any, actor: Any) -> Any:
    async def inner() -> list[dict[str, str]]:
        if await datasette.permission_allowed(actor, "view-instance", default=True):
            return [{"href": datasette.urls.path("/-/retention"), "label": "Retention"}]
        return []

    return inner


# -- pages ------------------------------------------------------------------------------

async def dashboard(datasette: Any, request: Any) -> Response:
    path, name = await _store(datasette, request)
    at = _moment(request)
    show_ids = await _may_view_customers(datasette, request)
    page = await asyncio.to_thread(_dashboard_data, path, at)
    if not show_ids:
        for row in page["at_risk"]:
            row["customer"] = None
    return Response.html(await datasette.render_template(
        "retention_dashboard.html",
        {**page, "database": name, "show_ids": show_ids, "at": at,
         "chart_url": datasette.urls.path("/-/retention/distribution.svg?" +
                                          urlencode({"at": at})),
         "customer_url": lambda cid: _customer_url(datasette, cid, at),
         "view_customers": VIEW_CUSTOMERS},
        request=request))


async def customer_page(datasette: Any, request: Any) -> Response:
    path, name = await _store(datasette, request)
    await _require_customers(datasette, request)
    customer = _customer(request)
    at = _moment(request)
    page = await asyncio.to_thread(_customer_data, path, customer, at)
    return Response.html(await datasette.render_template(
        "retention_customer.html",
        {**page, "database": name, "at": at,
         "chart_url": datasette.urls.path(
             f"/-/retention/customers/{quote(page['customer'], safe='')}/trajectory.svg?"
             + urlencode({"at": at})) if page["capital"] is not None else None,
         "dashboard_url": datasette.urls.path("/-/retention?" + urlencode({"at": at}))},
        request=request))


async def distribution_chart(datasette: Any, request: Any) -> Response:
    path, _ = await _store(datasette, request)
    at = _moment(request)
    return _svg(await asyncio.to_thread(_distribution_svg, path, at))


async def trajectory_chart(datasette: Any, request: Any) -> Response:
    path, _ = await _store(datasette, request)
    await _require_customers(datasette, request)
    customer = _customer(request)
    at = _moment(request)
    return _svg(await asyncio.to_thread(_trajectory_svg, path, customer, at))


# -- what the pages show, computed by the engine ------------------------------------------

def _open(path: str) -> Any:
    return Engine.open(path, read_only=True)


def _dashboard_data(path: str, at: str) -> dict[str, Any]:
    with _open(path) as engine:
        stats = engine.stats()
        spread = charts.distribution(engine, at)
        risky = engine.at_risk(now=at)
        levels = [(lv.name, lv.below) for lv in engine.rules.levels]
    opened = spread.customers
    known = sum(stats["customers_by_level"].values())
    by_level = [{"level": name, "customers": len(capitals)}
                for name, capitals in spread.by_level]
    by_level.append({"level": "prospect", "customers": known - opened})
    forces = [dict(f, force=charts.FORCES.get(f["category"], "time")) for f in stats["forces"]]
    totals = {force: sum(f["added"] + f["taken"] for f in forces if f["force"] == force)
              for force in ("retention forces", "pull-away forces", "incidents")}
    return {
        "by_level": by_level, "levels": levels, "at_risk": risky[:AT_RISK_LIMIT],
        "at_risk_count": len(risky), "decisions": stats["decisions"], "forces": forces,
        "totals": totals, "events": stats["events"], "customers": known,
    }


def _customer_data(path: str, customer: str, at: str) -> dict[str, Any]:
    with _open(path) as engine:
        try:
            info = engine.profile(customer, at)
        except UnknownCustomer:
            raise NotFound(f"unknown customer {customer!r}") from None
        made = engine.decisions(info["customer"])
    return {
        "customer": info["customer"],
        "identifiers": [info["customer"], *info["aliases"]],
        "capital": info["capital"], "level": info["level"],
        "last_contact": info["last_contact"], "consent": info["consent"],
        "ledger": info["ledger"],
        "ledger_total": sum(e["points"] for e in info["ledger"]),
        "decisions": [d.to_dict() for d in made if d.at <= parse_instant(at)],
    }


def _distribution_svg(path: str, at: str) -> bytes:
    with _open(path) as engine:
        data = charts.distribution(engine, at)
    with _DRAWING:
        return charts.render(charts.draw_distribution(data), "svg")


def _trajectory_svg(path: str, customer: str, at: str) -> bytes:
    with _open(path) as engine:
        try:
            data = charts.trajectory(engine, customer, at)
        except RetentionError as exc:  # unknown, or a prospect: nothing to draw
            raise NotFound(str(exc)) from None
    with _DRAWING:
        return charts.render(charts.draw_trajectory(data), "svg")


# -- the request at hand ------------------------------------------------------------------

def _config(datasette: Any) -> dict[str, Any]:
    return datasette.plugin_config(NAME) or {}


async def _store(datasette: Any, request: Any) -> tuple[str, str]:
    """The retention database's file and name, once the actor may see it."""
    actor = request.actor
    if not await datasette.permission_allowed(actor, "view-instance", default=True):
        raise Forbidden("view-instance")
    name = _config(datasette).get("database")
    found = None
    for db in datasette.databases.values():
        if db.path is None or (name is not None and db.name != name):
            continue
        (application,) = (await db.execute("PRAGMA application_id")).first()
        if application == APPLICATION_ID:
            found = db
            break
    if found is None:
        raise NotFound(f"no retention database {name!r}" if name else
                       "no retention database: serve one (datasette retention.db)")
    if not await datasette.permission_allowed(actor, "view-database", found.name,
                                              default=True):
        raise Forbidden("view-database")
    return found.path, found.name


async def _may_view_customers(datasette: Any, request: Any) -> bool:
    return bool(await datasette.permission_allowed(request.actor, VIEW_CUSTOMERS,
                                                   default=False))


async def _require_customers(datasette: Any, request: Any) -> None:
    if not await _may_view_customers(datasette, request):
        raise Forbidden(f"customer pages hold personal data: they need the "
                        f"{VIEW_CUSTOMERS} permission")


def _customer(request: Any) -> str:
    """The customer id or alias of the URL (no id is longer than the engine keeps)."""
    customer = unquote(request.url_vars["customer"])
    if len(customer) > MAX_NAME:
        raise NotFound(f"no customer id is longer than {MAX_NAME} characters")
    return customer


def _moment(request: Any) -> str:
    """``?at=`` as ISO-8601 (a zone required), or the clock now."""
    given = request.args.get("at")
    if not given:
        return datetime.now(UTC).isoformat(timespec="seconds")
    try:
        return parse_instant(given).isoformat()
    except TimeFormatError as exc:
        raise BadRequest(f"at: {exc}") from None


def _customer_url(datasette: Any, customer: str | None, at: str) -> str | None:
    if customer is None:
        return None
    return datasette.urls.path(f"/-/retention/customers/{quote(customer, safe='')}?"
                               + urlencode({"at": at}))


def _svg(body: bytes) -> Response:
    return Response(body, content_type="image/svg+xml",
                    headers={"X-Content-Type-Options": "nosniff"})
