"""The events Tryton sends the engine, posted only once Tryton has committed.

An event is written to the table ``retention_event`` in the transaction of the sale
or the complaint that made it, so it exists exactly when that transaction commits:
a rolled-back sale leaves none. The transaction is also joined by a data manager,
Tryton's two-phase commit hook (as ``trytond.sendmail`` sends mail only after the
commit): its ``tpc_finish`` runs after the commit only, never on a rollback, and
posts the transaction's events to the engine. When the engine cannot take them (a
remote server down), they stay ``pending`` and the cron ``Post Retention Events``
tries again; nothing raised there reaches the sale, and while events that failed
wait for the cron, new ones are left to it too (no request waits for an engine that
is down). Events are idempotent by id in
the engine, so an event posted twice (a crash between posting and marking it) counts
once.

The model ``retention.engine`` holds the engine's own crons: ``tick`` (apply time:
levels crossed by silence fire) and ``deliver`` (the decisions whose sink is
``tryton`` become party categories and notes, see ``sink.py``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from trytond.model import Index, Model, ModelSQL, ModelView, fields
from trytond.pool import Pool, PoolMeta
from trytond.transaction import Transaction, without_check_access

from . import engine

logger = logging.getLogger(__name__)

#: events posted per request to the engine
BATCH = 500


class Event(ModelSQL, ModelView):
    "Retention Event"
    __name__ = 'retention.event'

    event_id = fields.Char("Event ID", readonly=True)
    type = fields.Char("Type", required=True, readonly=True)
    party = fields.Many2One(
        'party.party', "Party", readonly=True, ondelete='SET NULL')
    payload = fields.Text("Payload", required=True, readonly=True)
    state = fields.Selection([
            ('pending', "Pending"),
            ('posted', "Posted"),
            ], "State", required=True, readonly=True)
    attempts = fields.Integer("Attempts", readonly=True)
    error = fields.Char("Error", readonly=True)
    posted_at = fields.Timestamp("Posted At", readonly=True)

    @classmethod
    def __setup__(cls):
        super().__setup__()
        table = cls.__table__()
        cls._sql_indexes.add(Index(
                table, (table.state, Index.Equality(cardinality='low')),
                where=table.state == 'pending'))
        cls._order.insert(0, ('id', 'DESC'))

    @classmethod
    def default_state(cls):
        return 'pending'

    @classmethod
    def default_attempts(cls):
        return 0

    @classmethod
    def send(cls, events: list[tuple[Any, dict[str, Any]]]) -> None:
        """Queue ``(party, event)`` pairs in the current transaction; they are posted
        after it commits."""
        if not events:
            return
        with without_check_access():
            records = cls.create([{
                        'event_id': event.get('id'),
                        'type': event['type'],
                        'party': party.id if party else None,
                        'payload': json.dumps(event, sort_keys=True),
                        } for party, event in events])
        manager = Transaction().join(AfterCommit())
        manager.ids.extend(r.id for r in records)

    @classmethod
    def post_pending(cls, ids: list[int] | None = None) -> None:
        """Post the pending events (those of ``ids`` only, when given), oldest first;
        the cron's method. A failure is recorded on the events, never raised."""
        domain = [('state', '=', 'pending')]
        if ids is not None:
            domain.append(('id', 'in', ids))
        with without_check_access():
            while pending := cls.search(domain, order=[('id', 'ASC')], limit=BATCH):
                try:
                    engine.post([json.loads(e.payload) for e in pending])
                except Exception as exc:  # whatever it is, the sale is not concerned
                    logger.warning("retention: %d events not posted: %s",
                                   len(pending), exc)
                    for event in pending:
                        event.attempts = (event.attempts or 0) + 1
                        event.error = str(exc)[:500]
                    cls.save(pending)
                    return
                cls.write(pending, {
                        'state': 'posted', 'error': None,
                        'posted_at': dt.datetime.now(),
                        })
                if len(pending) < BATCH:
                    return


class AfterCommit:
    """A Tryton data manager: posts the transaction's events once it has committed."""

    def __init__(self):
        self.ids: list[int] = []

    def __eq__(self, other):
        # one per transaction: Transaction.join returns the one already joined
        return isinstance(other, AfterCommit)

    def __hash__(self):
        return hash(AfterCommit)

    def tpc_begin(self, transaction):
        pass

    def commit(self, transaction):
        pass

    def tpc_vote(self, transaction):
        pass

    def tpc_finish(self, transaction):
        # Tryton has committed: the events exist. Post them in a transaction of
        # their own (the one that made them is over), and never raise: a failure
        # leaves them pending for the cron.
        try:
            with transaction.new_transaction() as posting:
                Event = Pool().get('retention.event')
                # events that failed already: the engine is probably down, and the
                # user is not kept waiting for it again; the cron takes them all
                if not Event.search([
                            ('state', '=', 'pending'),
                            ('attempts', '>', 0),
                            ], limit=1):
                    Event.post_pending(self.ids)
                    posting.commit()
        except Exception:
            logger.warning("retention: events left pending for the cron",
                           exc_info=True)
        self.ids = []

    def tpc_abort(self, transaction):
        # rolled back: the events were never written; nothing to post
        self.ids = []


class Engine(Model):
    "Retention Engine"
    __name__ = 'retention.engine'

    @classmethod
    def tick(cls) -> None:
        """Apply time up to now (the cron's method): levels that silence crosses fire.
        Only the embedded engine: a remote one ticks in ``retention serve``."""
        if not engine.remote():
            engine.embedded().tick(now_or_context())

    @classmethod
    def deliver(cls) -> None:
        """Deliver the decisions due to the ``tryton`` sink (the cron's method)."""
        from .sink import deliver
        deliver()


class Cron(metaclass=PoolMeta):
    __name__ = 'ir.cron'

    @classmethod
    def __setup__(cls):
        super().__setup__()
        cls.method.selection.extend([
                ('retention.event|post_pending', "Post Retention Events"),
                ('retention.engine|tick', "Apply Time to Retention Capital"),
                ('retention.engine|deliver', "Deliver Retention Decisions"),
                ])


def now_or_context() -> dt.datetime:
    """The moment the engine is read at: the context's ``retention_at`` (an aware
    datetime, or a naive one in UTC as Tryton keeps them), else now."""
    at = Transaction().context.get('retention_at')
    if at is None:
        return dt.datetime.now(dt.UTC)
    if isinstance(at, str):
        at = dt.datetime.fromisoformat(at)
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)
