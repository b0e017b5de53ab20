"""Delivering decisions from the outbox to the sinks their actions name.

A decision is claimed in one transaction (status ``sending``, with a lease), handed
to its sink outside any transaction, then marked ``sent`` or ``failed`` in another.
A process that dies mid-delivery leaves the decision ``sending``; once the lease
runs out, the next delivery run claims it again. So every decision is delivered at
least once, and its id travels with it as the idempotency key a host deduplicates
on. A failed decision is tried again after an exponential backoff, up to
``max_attempts`` tries; then it stays ``failed`` until an operator retries it. A run
tries each decision at most once.

A decision is delivered only while it is fresh: one older than its action's
``max_age`` (the run's default when the rule file gives none) when a run reaches it
becomes ``expired``, with the reason, and is never sent, so a backfill of history
never reaches customers. Its age is the run's clock minus the decision's time (event
time). A decision already handed to a sink by a process that died is not expired:
it may have gone out, and it is delivered again, at least once.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import RetentionError
from .models import Decision
from .rules.model import Action
from .store import decision_of
from .times import from_seconds

#: tries before a decision stays failed for an operator
MAX_ATTEMPTS = 8
#: seconds before the first retry; each further retry waits twice as long
BACKOFF = 30.0
#: the longest wait between two tries (seconds)
MAX_BACKOFF = 3600.0
#: seconds a claimed decision belongs to the process delivering it
LEASE = 300.0
#: failures in a row after which a run stops trying a sink (it is probably down)
BREAKER = 5
#: seconds after which an undelivered decision expires, unless its action says
MAX_AGE = 7 * 86400.0


class DeliveryError(RetentionError):
    """A sink could not deliver a decision. ``permanent`` says that trying again
    cannot help (no address, a template missing, the receiver refused it for good).
    ``retry_after`` (seconds) says the receiver asked to be left alone that long (a
    429 with ``Retry-After``): the decision waits at least that long, and the sink's
    other decisions wait for the next run."""

    def __init__(self, message: str, *, permanent: bool = False,
                 retry_after: float | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


class SettingError(RetentionError):
    """A sink or source lacks a setting it needs."""


@attrs.frozen
class Settings:
    """Settings of sinks and sources: ``values`` holds ``"section.key"`` entries
    (``retention deliver --set email.host=...``); a key missing there is read from the
    environment as ``RETENTION_<SECTION>_<KEY>`` (``RETENTION_EMAIL_HOST``)."""

    values: Mapping[str, str] = attrs.field(factory=dict)
    environ: Mapping[str, str] = attrs.field(factory=lambda: os.environ, repr=False)

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        value = self.values.get(f"{section}.{key}")
        if value is None:
            value = self.environ.get(env_name(section, key))
        return default if value is None or value == "" else value

    def require(self, section: str, key: str) -> str:
        value = self.get(section, key)
        if value is None:
            raise SettingError(f"{section}: set {env_name(section, key)} "
                               f"(or --set {section}.{key}=...)")
        return value

    def flag(self, section: str, key: str, default: bool = False) -> bool:
        value = self.get(section, key)
        if value is None:
            return default
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingError(f"{section}: {env_name(section, key)} must be true or false, "
                           f"got {value!r}")

    def number(self, section: str, key: str, default: float) -> float:
        value = self.get(section, key)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise SettingError(f"{section}: {env_name(section, key)} must be a number, "
                               f"got {value!r}") from None


def env_name(section: str, key: str) -> str:
    return f"RETENTION_{section}_{key}".upper().replace("-", "_").replace(".", "_")


def parse_settings(pairs: Iterable[str]) -> dict[str, str]:
    """``["email.host=localhost", ...]`` as a mapping; a malformed pair is an error."""
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot or not section.strip() or not key.strip():
            raise SettingError(f"--set {pair!r}: write SECTION.KEY=VALUE, like "
                               "email.host=smtp.example.com")
        values[f"{section.strip()}.{key.strip()}"] = value
    return values


@attrs.frozen(kw_only=True)
class Delivery:
    """What a sink gets: the decision, its action as the rules declare it, every
    identifier known for the customer (``email:ann@example.com``...), the folder of
    the message templates, and the number of this try (1 for the first)."""

    decision: Decision
    action: Action | None
    identifiers: tuple[str, ...] = ()
    templates: Path | None = None
    attempt: int = 1

    @property
    def key(self) -> str:
        """The idempotency key: the decision id, the same on every try."""
        return self.decision.id

    def identifier(self, prefix: str) -> str | None:
        """The first identifier ``prefix:value`` of the customer, as ``value``."""
        for name in self.identifiers:
            scheme, sep, value = name.partition(":")
            if sep and scheme == prefix and value:
                return value
        return None


#: SQL: a decision due for delivery in a run that began at the first instant given, now
#: the second: pending, failed with its backoff over when the run began (a failure in
#: this run is due after its start, whatever the backoff: a run tries a decision once),
#: or left sending by a process whose lease ran out
_DUE = ("customer IS NOT NULL AND (status = 'pending' OR (status = 'failed' AND"
        " next_try <= ?) OR (status = 'sending' AND lease_until <= ?))")
#: SQL: a due decision that may expire: not applied in a purchase, and not one a dead
#: process may have handed to its sink already
_MAY_EXPIRE = ("via IS NOT NULL AND kind != 'in_purchase' AND customer IS NOT NULL AND"
               " (status = 'pending' OR (status = 'failed' AND next_try <= ?))")


@attrs.frozen
class _Claim:
    """A decision this process marked ``sending``: the number of this try, the status
    it had, and the end of its lease (which also tells this claim from a later one)."""

    decision: Decision
    attempt: int
    prior: str
    lease_until: float


@attrs.define
class DeliveryReport:
    """What one delivery run did."""

    sent: int = 0
    failed: int = 0
    #: failed decisions that reached the limit and wait for an operator
    gave_up: int = 0
    #: decisions older than their max_age: never sent
    expired: int = 0
    #: pending decisions whose sink no loaded plugin provides: via -> count
    waiting: Counter[str] = attrs.Factory(Counter)
    #: sinks that could not work in this run (a setting missing or refused): name ->
    #: why; their decisions were not tried and wait as they were
    unavailable: dict[str, str] = attrs.Factory(dict)
    #: sinks set aside for the rest of the run after failures in a row: name -> why
    paused: dict[str, str] = attrs.Factory(dict)
    #: the first failures, as ``decision id: error`` (at most 100)
    errors: list[str] = attrs.Factory(list)
    #: every failure by kind: the error with the customer's identifiers masked ->
    #: [how many decisions, the first one's id]
    failures: dict[str, list[Any]] = attrs.Factory(dict)


def backoff(attempts: int, base: float = BACKOFF, cap: float = MAX_BACKOFF) -> float:
    """Seconds to wait after the ``attempts``-th failed try."""
    return min(cap, base * 2 ** max(0, attempts - 1))


class Deliverer:
    """Delivers the outbox of a stored engine through the sinks.

    ``sinks`` maps a sink name to its factory (``plugins.sinks()``); a factory is
    called with ``settings`` the first time a decision needs it. ``routes`` sends
    the decisions of one ``via`` to another sink (``{"crm_task": "log"}``).
    ``max_age`` (seconds) is the age past which a decision expires when its action
    gives none; ages are measured at ``as_of`` when given (seconds: a rehearsal of a
    run on another day), else on ``clock``, which also times backoffs and leases.
    """

    def __init__(self, store: Any, sinks: Mapping[str, Callable[[Settings], Any]], *,
                 settings: Settings | None = None, routes: Mapping[str, str] | None = None,
                 templates: Path | None = None, max_attempts: int = MAX_ATTEMPTS,
                 base_backoff: float = BACKOFF, lease: float = LEASE,
                 max_age: float = MAX_AGE, as_of: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.factories = dict(sinks)
        self.settings = settings or Settings()
        self.routes = dict(routes or {})
        for via, target in self.routes.items():
            if target not in self.factories:
                raise SettingError(f"--route {via}={target}: no sink named {target!r} "
                                   f"(sinks: {', '.join(sorted(self.factories))})")
        self.templates = templates
        self.max_attempts = max(1, max_attempts)
        self.base_backoff = base_backoff
        self.lease = lease
        if not max_age > 0:
            raise SettingError("max_age must be longer than zero")
        self.max_age = max_age
        self.as_of = as_of
        self.clock = clock
        self._sinks: dict[str, Any] = {}
        #: per run: sinks not to try again (name -> why), failures in a row per sink
        self._down: dict[str, str] = {}
        self._strikes: Counter[str] = Counter()
        self._run_start = self.clock()

    # -- which sinks -------------------------------------------------------------------

    def sink_name(self, via: str) -> str | None:
        name = self.routes.get(via, via)
        return name if name in self.factories else None

    def _deliverable(self, *, all_loaded: bool = False) -> list[str]:
        """The ``via`` names a loaded sink (or a route) delivers in this run (or at all)."""
        return sorted(via for via in set(self.factories) | set(self.routes)
                      if (name := self.sink_name(via)) is not None
                      and (all_loaded or name not in self._down))

    def _prepare(self, report: DeliveryReport) -> None:
        """Set up the sinks the due decisions need, before any is claimed: a sink
        missing a setting is left out of the run, and its decisions wait as they are."""
        for (via,) in self.store.db.conn.execute(
                f"SELECT DISTINCT via FROM decisions WHERE via IS NOT NULL AND {_DUE}",
                [self._run_start, self._run_start]).fetchall():
            name = self.sink_name(via)
            if name is not None and name not in self._down:
                try:
                    self._sink(name)
                except SettingError as exc:
                    self._down[name] = report.unavailable[name] = str(exc)

    def _sink(self, name: str) -> Any:
        sink = self._sinks.get(name)
        if sink is None:
            sink = self._sinks[name] = self.factories[name](self.settings)
        return sink

    def close(self) -> None:
        for sink in self._sinks.values():
            closer = getattr(sink, "close", None)
            if closer is not None:
                closer()
        self._sinks.clear()

    # -- the loop ----------------------------------------------------------------------

    def run(self, *, limit: int | None = None, chunk: int = 10) -> DeliveryReport:
        """Deliver what is due now: pending decisions, failed ones whose backoff has
        passed, and ones a dead process left ``sending`` past their lease."""
        report = DeliveryReport()
        self.store.follow_rules()  # the actions as the active rules declare them
        self._run_start = self.clock()
        self._down.clear()
        self._strikes.clear()
        self._expire_stale(report)
        self._prepare(report)
        done = 0
        while limit is None or done < limit:
            claimed = self._claim(chunk if limit is None else min(chunk, limit - done),
                                  report)
            if not claimed:
                break
            self._deliver_all(claimed, report)
            done += len(claimed)
        report.waiting.update(self._waiting())
        return report

    def retry(self, decision_id: str) -> DeliveryReport:
        """Deliver one decision now, whatever its tries so far (an operator's retry of
        a failed decision, or an early try of a pending one)."""
        conn = self.store.db.conn
        row = conn.execute("SELECT status, via, customer FROM decisions WHERE id = ?",
                           [decision_id]).fetchone()
        if row is None:
            raise RetentionError(f"no decision {decision_id!r} in the outbox")
        status, via, customer = row
        if customer is None:
            raise RetentionError(f"decision {decision_id} belongs to a forgotten customer: "
                                 "it cannot be delivered")
        if status not in ("failed", "pending"):
            raise RetentionError(f"decision {decision_id} is {status}: only a failed or "
                                 "pending decision can be retried")
        if via is None:
            raise RetentionError(f"decision {decision_id} has no sink: its action is "
                                 "applied in the purchase")
        if self.sink_name(via) is None:
            raise RetentionError(f"decision {decision_id}: no sink named {via!r} is loaded "
                                 "(see retention plugins, or --route)")
        self._sink(self.sink_name(via))  # a missing setting stops here, nothing changed
        with self.store._writing():
            changed = conn.execute(
                "UPDATE decisions SET status = 'pending', attempts = 0, next_try = NULL"
                " WHERE id = ? AND status IN ('failed', 'pending')", [decision_id]).rowcount
        if not changed:  # another process took it in the meantime
            raise RetentionError(f"decision {decision_id} is being delivered by another "
                                 "process: see retention decisions")
        report = DeliveryReport()
        self._run_start = self.clock()
        self._down.clear()
        self._deliver_all(self._claim(1, report, only=decision_id), report)
        if report.unavailable:
            raise SettingError(next(iter(report.unavailable.values())))
        return report

    def _deliver_all(self, claimed: list[_Claim], report: DeliveryReport) -> None:
        """Deliver claimed decisions in order. Those not handed to a sink yet are given
        back at once when one stops the run (Ctrl-C...), or when half their lease has
        gone by (a slow sink): another process must not find them due while they
        still wait here."""
        for n, claim in enumerate(claimed):
            try:
                if self.clock() >= claim.lease_until - self.lease / 2:
                    for rest in claimed[n:]:
                        self._release(rest)
                    return
                self._deliver_one(claim, report)
            except BaseException:
                for rest in claimed[n + 1:]:
                    self._release(rest)
                raise

    def _claim(self, n: int, report: DeliveryReport | None = None,
               only: str | None = None) -> list[_Claim]:
        """Up to ``n`` due decisions, marked ``sending`` in one transaction: each with
        the number of this try and the status it had. A due decision that has grown
        too old since the run began expires instead (counted in ``report``)."""
        report = report or DeliveryReport()
        vias = self._deliverable()
        if not vias:
            return []
        marks = ",".join("?" * len(vias))
        where = f"via IN ({marks}) AND {_DUE}"
        if only is not None:
            where += " AND id = ?"
        conn = self.store.db.conn
        with self.store._writing():
            while True:
                now = self.clock()
                rows = conn.execute(
                    "SELECT id, customer, rule, action, params, at, kind, via, trigger,"
                    f" status, reason, attempts, ts FROM decisions WHERE {where}"
                    " ORDER BY ts, id LIMIT ?",
                    [*vias, self._run_start, now, *([only] if only else []), n]).fetchall()
                fresh = [row for row in rows if not self._expire_one(row, report)]
                if fresh or not rows:
                    break
            conn.executemany(
                "UPDATE decisions SET status = 'sending', lease_until = ?,"
                " attempts = attempts + 1 WHERE id = ?",
                [(now + self.lease, row[0]) for row in fresh])
        return [_Claim(decision=attrs.evolve(decision_of(row[:11]), status="sending"),
                       attempt=row[11] + 1, prior=row[9], lease_until=now + self.lease)
                for row in fresh]

    # -- freshness ---------------------------------------------------------------------

    def _freshness_clock(self) -> float:
        return self.clock() if self.as_of is None else self.as_of

    def max_age_of(self, action: str) -> float:
        """Seconds after which a decision of ``action`` expires: its own ``max_age``,
        else the run's default (an action the rules no longer declare has the default)."""
        declared = self.store.rules.actions.get(action)
        if declared is not None and declared.max_age is not None:
            return declared.max_age
        return self.max_age

    def _expire_stale(self, report: DeliveryReport) -> None:
        """Expire, in one transaction, every due decision older than its max_age, one
        statement per max_age: a backfill's thousands of old decisions never reach the
        claiming loop."""
        now = self._freshness_clock()
        own = {name: a.max_age for name, a in self.store.rules.actions.items()
               if a.max_age is not None}
        groups: dict[float, list[str]] = {}
        for name, age in own.items():
            groups.setdefault(age, []).append(name)
        conn = self.store.db.conn
        with self.store._writing():
            for age, names in groups.items():
                marks = ",".join("?" * len(names))
                report.expired += conn.execute(
                    f"UPDATE decisions SET {_EXPIRED} WHERE {_MAY_EXPIRE} AND ts < ?"
                    f" AND action IN ({marks})",
                    [_expiry_reason(age, now), self._run_start, now - age, *names]).rowcount
            marks = ",".join("?" * len(own)) or "NULL"
            report.expired += conn.execute(
                f"UPDATE decisions SET {_EXPIRED} WHERE {_MAY_EXPIRE} AND ts < ?"
                f" AND action NOT IN ({marks})",
                [_expiry_reason(self.max_age, now), self._run_start, now - self.max_age,
                 *own]).rowcount

    def _expire_one(self, row: tuple[Any, ...], report: DeliveryReport) -> bool:
        """Expire the claimed row if it is older than its max_age (in the claiming
        transaction); say whether it was."""
        did, action, kind, status, ts = row[0], row[3], row[6], row[9], row[12]
        if kind == "in_purchase" or status == "sending":
            return False
        now, age = self._freshness_clock(), self.max_age_of(action)
        if ts >= now - age:
            return False
        self.store.db.conn.execute(f"UPDATE decisions SET {_EXPIRED} WHERE id = ?",
                                   [_expiry_reason(age, now), did])
        report.expired += 1
        return True

    def _deliver_one(self, claim: _Claim, report: DeliveryReport) -> None:
        decision, attempt = claim.decision, claim.attempt
        assert decision.via is not None
        name = self.sink_name(decision.via)
        if name is not None and name in self._down:  # set aside earlier in this run
            self._release(claim)
            return
        delivery = Delivery(decision=decision,
                            action=self.store.rules.actions.get(decision.action),
                            identifiers=tuple(self.store.identifiers(decision.customer)),
                            templates=self.templates, attempt=attempt)
        try:
            if name is None:
                raise DeliveryError(f"no sink named {decision.via!r} is loaded")
            self._sink(name).deliver(delivery)
        except SettingError as exc:
            # a configuration problem (a login refused...): nothing is spent, and the
            # sink is left out of the rest of the run
            self._release(claim)
            assert name is not None
            self._down[name] = report.unavailable[name] = str(exc)
            return
        except Exception as exc:  # a sink is plugin code: any failure is recorded
            permanent = isinstance(exc, DeliveryError) and exc.permanent
            wait = exc.retry_after if isinstance(exc, DeliveryError) else None
            message = str(exc) if isinstance(exc, RetentionError) else \
                f"{type(exc).__name__}: {exc}"
            message = " ".join(message.split())[:500] or type(exc).__name__
            self._failed(claim, message, permanent, report, delivery.identifiers, wait)
            if name is not None and wait is not None and not permanent:
                # rate limited: asking again before it says is asking to be refused
                self._down[name] = report.paused[name] = (
                    f"{name}: rate limited, asked to wait {duration_text(wait)}; its other "
                    "decisions wait for the next run")
            elif name is not None and not permanent:
                self._strikes[name] += 1
                if self._strikes[name] >= BREAKER:  # probably down: the rest wait
                    self._down[name] = report.paused[name] = (
                        f"{name}: {BREAKER} failures in a row; its other decisions wait "
                        "for the next run")
            return
        if name is not None:
            self._strikes[name] = 0
        self._settle(claim, "status = 'sent', reason = NULL, next_try = NULL, sent_at = ?",
                     [from_seconds(self.clock()).isoformat()])
        report.sent += 1

    def _settle(self, claim: _Claim, assignments: str, values: list[Any]) -> bool:
        """Record the outcome of a claim, if it is still this process's: a claim whose
        lease ran out may have been taken by another process, whose outcome stands."""
        with self.store._writing():
            cursor = self.store.db.conn.execute(
                f"UPDATE decisions SET {assignments}, lease_until = NULL"
                " WHERE id = ? AND status = 'sending' AND lease_until = ?",
                [*values, claim.decision.id, claim.lease_until])
        return cursor.rowcount == 1

    def _release(self, claim: _Claim) -> None:
        """Give a claimed decision back as it was (a dead sender's becomes pending)."""
        self._settle(claim, "status = ?, attempts = attempts - 1",
                     ["pending" if claim.prior == "sending" else claim.prior])

    def _failed(self, claim: _Claim, message: str, permanent: bool,
                report: DeliveryReport, identifiers: tuple[str, ...] = (),
                retry_after: float | None = None) -> None:
        did, attempt = claim.decision.id, claim.attempt
        final = permanent or attempt >= self.max_attempts
        wait = max(backoff(attempt, self.base_backoff), retry_after or 0.0)
        next_try = None if final else self.clock() + wait
        if next_try is not None and next_try <= self._run_start:
            # (a zero backoff under a clock that stands still) due after this run began
            next_try = math.nextafter(self._run_start, math.inf)
        self._settle(claim, "status = 'failed', reason = ?, next_try = ?", [message, next_try])
        report.failed += 1
        if final:
            report.gave_up += 1
        if len(report.errors) < 100:
            report.errors.append(f"{did}: {message}")
        kind = report.failures.setdefault(
            error_kind(message, claim.decision.customer, identifiers), [0, did])
        kind[0] += 1

    def _waiting(self) -> Counter[str]:
        """Pending decisions no loaded sink delivers, by ``via``."""
        vias = self._deliverable(all_loaded=True)
        marks = ",".join("?" * len(vias)) or "NULL"
        rows = self.store.db.conn.execute(
            "SELECT via, count(*) FROM decisions WHERE status = 'pending' AND via IS NOT NULL"
            " AND customer IS NOT NULL"
            f" AND via NOT IN ({marks}) GROUP BY via", vias)
        return Counter(dict(rows.fetchall()))


#: SQL: the assignments that expire a decision, the reason given
_EXPIRED = "status = 'expired', reason = ?, next_try = NULL, lease_until = NULL"


def _expiry_reason(max_age: float, now: float) -> str:
    return (f"older than its max_age of {duration_text(max_age)} when delivery reached it "
            f"at {from_seconds(now).isoformat(timespec='seconds')}: not sent")


def duration_text(seconds: float) -> str:
    """``604800`` as ``7d``: a duration as a rule file writes it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def error_kind(message: str, customer: str, identifiers: Iterable[str] = ()) -> str:
    """A sink's error with the customer's id and identifiers masked, so that the same
    failure for many customers ("no email address for customer c-1") reads as one
    kind of error. (A value of digits alone is left: it could be a status code.)"""
    values = {customer, *(name.partition(":")[2] for name in identifiers)}
    for value in sorted((v for v in values if len(v) >= 2 and not v.isdigit()), key=len,
                        reverse=True):
        message = re.sub(rf"(?<![\w.@-]){re.escape(value)}(?![\w.@-])", "<customer>",
                         message)
    return message


def decision_payload(decision: Decision) -> bytes:
    """A decision as the JSON body sinks send."""
    data = decision.to_dict()
    del data["status"], data["reason"]  # the outbox's bookkeeping, not the decision
    return json.dumps({"type": "retention.decision", "data": data},
                      separators=(",", ":"), ensure_ascii=False).encode()
