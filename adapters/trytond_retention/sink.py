"""The ``tryton`` sink: the engine's decisions back in Tryton, on the party.

- ``crm_tag``: the party gets the category named after the decision's level (or
  rule), under a parent category ``Retention``; the category is looked up before it
  is made, and a party that has it already is left as it is.
- ``crm_task`` (and any decision routed here): a note on the party (``ir.note``)
  saying what to do and why, ending with ``[retention decision ID]``; a note with that
  mark is looked up first, so a decision delivered twice makes one note.

The party is the customer's ``tryton:ID`` identifier (a customer who never came
through Tryton has none: a permanent failure). The sink works inside the Tryton
process, in the transaction at hand, which it commits once the category or the note
is written, so the engine records a decision ``sent`` only when Tryton has it. The
cron ``Deliver Retention Decisions`` runs it (``deliver`` below) over the embedded
engine. Outside Tryton (``retention deliver --route crm_tag=tryton``, on the machine
of a remote engine), it opens a transaction of its own on ``tryton.database`` with
the trytond configuration file ``tryton.config``.
"""

from __future__ import annotations

import logging
from typing import Any

from trytond.pool import Pool
from trytond.transaction import Transaction, without_check_access

from retention.delivery import Deliverer, Delivery, DeliveryError, SettingError, Settings

from . import engine, facts
from .event import now_or_context

logger = logging.getLogger(__name__)

#: the ``via`` the cron hands to this sink
ROUTED = ("crm_tag", "crm_task")
PARENT = "Retention"


class TrytonSink:
    def __init__(self, settings: Settings):
        self.database = None
        if Transaction().database is None:  # outside the Tryton process
            self.database = settings.require("tryton", "database")
            if path := settings.get("tryton", "config"):
                from trytond import config
                config.update_etc(path)
            if self.database not in Pool.database_list():
                with Transaction().start(self.database, 0, readonly=True):
                    Pool(self.database).init()

    def deliver(self, delivery: Delivery) -> None:
        if self.database is None:
            transaction = Transaction()
            try:
                self._deliver(delivery)
            except BaseException:
                # nothing half-written goes out with the next decision's commit
                transaction.rollback()
                raise
            transaction.commit()
            return
        with Transaction().start(self.database, 0, context={'_skip_warnings': True}):
            self._deliver(delivery)

    def _deliver(self, delivery: Delivery) -> None:
        party = party_of(delivery)
        with without_check_access():
            if delivery.decision.via == "crm_tag":
                tag(party, delivery.decision)
            else:
                note(party, delivery)


def party_of(delivery: Delivery) -> Any:
    Party = Pool().get('party.party')
    for name in delivery.identifiers:
        party = facts.party_id(name)
        if party is not None and (parties := Party.search([('id', '=', party)])):
            return parties[0]
    raise DeliveryError(f"customer {delivery.decision.customer} is no Tryton party",
                        permanent=True)


def category(name: str, parent: Any = None) -> Any:
    """The party category ``name`` (under ``parent``), made when it is not there."""
    Category = Pool().get('party.category')
    found = Category.search([
            ('name', '=', name),
            ('parent', '=', parent.id if parent else None),
            ], limit=1)
    if found:
        return found[0]
    made, = Category.create([{'name': name, 'parent': parent.id if parent else None}])
    return made


def tag(party: Any, decision: Any) -> None:
    Party = Pool().get('party.party')
    wanted = category(decision.rule, category(PARENT))
    if wanted not in party.categories:
        Party.write([party], {'categories': [('add', [wanted.id])]})


def mark(decision_id: str) -> str:
    return f"[retention decision {decision_id}]"


def note(party: Any, delivery: Delivery) -> None:
    Note = Pool().get('ir.note')
    decision = delivery.decision
    if Note.search([
                ('resource', '=', str(party)),
                ('message', 'like', f"%{mark(decision.id)}"),
                ], limit=1):
        return
    lines = [f"Retention: {decision.action} ({decision.rule}), decided "
             f"{decision.at.isoformat(timespec='minutes')}."]
    if decision.params:
        lines.append(", ".join(f"{k}: {v}" for k, v in sorted(decision.params.items())))
    lines.append(mark(decision.id))
    Note.create([{'resource': str(party), 'message': "\n".join(lines)}])


def deliver() -> Any:
    """Deliver the embedded engine's decisions for ``crm_tag`` and ``crm_task`` through
    this sink, in the Tryton process (the cron's work); other decisions wait for
    their own sinks (``retention deliver``). Ages are measured at the context's
    ``retention_at`` when given."""
    if engine.remote():
        logger.info("retention: the engine is remote; its server delivers")
        return None
    at = now_or_context()
    deliverer = Deliverer(engine.embedded(), {"tryton": TrytonSink},
                          routes={via: "tryton" for via in ROUTED},
                          as_of=at.timestamp())
    try:
        report = deliverer.run()
    except SettingError as exc:
        logger.warning("retention: %s", exc)
        return None
    finally:
        deliverer.close()
    if report.errors:
        logger.warning("retention: %d decisions failed: %s", report.failed,
                       "; ".join(report.errors[:5]))
    return report
