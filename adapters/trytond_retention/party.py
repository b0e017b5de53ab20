"""The party as the engine sees it: function fields read from the engine each time,
never stored in Tryton's tables, and the parties at risk, most urgent first.

The moment read is now, or the context's ``retention_at`` (a datetime). Fields:

- ``retention_customer``: the engine's customer for the party (``email:...``);
- ``retention_capital``, ``retention_level``: the capital at that moment and the level
  the party is in then;
- ``retention_ledger``: the ledger entries that add up to that capital, one a line;
- ``retention_rank``: the party's place among the customers at risk (1: the lowest
  capital), empty when not at risk. It can be searched and ordered on, which is how
  the action "Parties at Risk" lists them.
"""

from __future__ import annotations

import logging

from sql import Literal
from sql.conditionals import Case
from trytond.exceptions import UserError
from trytond.model import fields
from trytond.pool import Pool, PoolMeta

from retention import RetentionError

from . import engine, facts
from .event import now_or_context

logger = logging.getLogger(__name__)

_OPERATORS = {
    '=': lambda a, b: a == b, '!=': lambda a, b: a != b,
    '<': lambda a, b: a < b, '<=': lambda a, b: a <= b,
    '>': lambda a, b: a > b, '>=': lambda a, b: a >= b,
    }


class Party(metaclass=PoolMeta):
    __name__ = 'party.party'

    retention_customer = fields.Function(
        fields.Char("Retention Customer"), 'get_retention')
    retention_capital = fields.Function(
        fields.Float("Capital", digits=(12, 2),
            help="The tolerance capital, as the retention engine computes it."),
        'get_retention')
    retention_level = fields.Function(
        fields.Char("Level", help="The rupture level the party is in."),
        'get_retention')
    retention_ledger = fields.Function(
        fields.Text("Ledger",
            help="What added to the capital and what took from it."),
        'get_retention')
    retention_rank = fields.Function(
        fields.Integer("Urgency",
            help="1 for the party at risk with the lowest capital."),
        'get_retention_rank', searcher='search_retention_rank')

    @classmethod
    def get_retention(cls, parties, names):
        result = {name: {p.id: None for p in parties} for name in names}
        at = now_or_context()
        for party in parties:
            try:
                profile = engine.profile(facts.party_alias(party), at)
            except RetentionError as exc:
                # the form still opens when the engine cannot be read
                logger.warning("retention: party %s not read: %s", party.id, exc)
                continue
            if profile is None:
                continue
            values = {
                'retention_customer': profile['customer'],
                'retention_capital': profile['capital'],
                'retention_level': profile['level'],
                'retention_ledger': ledger_text(profile['ledger']),
                }
            for name in names:
                result[name][party.id] = values[name]
        return result

    @classmethod
    def retention_ranks(cls) -> dict[int, int]:
        """Party id -> place among the customers at risk now (1: most urgent)."""
        ranks: dict[int, int] = {}
        try:
            rows = engine.at_risk(now_or_context())
        except RetentionError as exc:
            # a remote engine, or none configured: the user is told why, in one line
            raise UserError(str(exc)) from None
        for place, row in enumerate(rows, 1):
            for name in row['identifiers']:
                party = facts.party_id(name)
                if party is not None:
                    ranks.setdefault(party, place)
        return ranks

    @classmethod
    def get_retention_rank(cls, parties, name):
        ranks = cls.retention_ranks()
        return {p.id: ranks.get(p.id) for p in parties}

    @classmethod
    def search_retention_rank(cls, name, clause):
        _, operator, value = clause[:3]
        ranks = cls.retention_ranks()
        if value is None and operator in {'=', '!='}:
            return [('id', 'not in' if operator == '=' else 'in', list(ranks))]
        test = _OPERATORS.get(operator)
        if test is None:
            raise ValueError(f"retention_rank: operator {operator!r} not supported")
        return [('id', 'in', [i for i, r in ranks.items() if test(r, value)])]

    @classmethod
    def order_retention_rank(cls, tables):
        table, _ = tables[None]
        ranks = cls.retention_ranks()
        if not ranks:
            return [Literal(0)]
        # parties not at risk come after those that are
        return [Case(*((table.id == i, r) for i, r in ranks.items()),
                else_=len(ranks) + 1)]


class ContactMechanism(metaclass=PoolMeta):
    __name__ = 'party.contact_mechanism'

    @classmethod
    def on_modification(cls, mode, mechanisms, field_names=None):
        super().on_modification(mode, mechanisms, field_names=field_names)
        if mode == 'delete' or (field_names is not None
                                and not {'value', 'type', 'party'} & set(field_names)):
            return
        Pool().get('retention.event').send([
                (m.party, event) for m in mechanisms
                if m.type == 'email' and m.party
                for event in facts.identify_party(m.party, m.value)])


def ledger_text(ledger: list[dict]) -> str:
    """The ledger entries, one a line: when, the points, the rule and why."""
    lines = []
    for entry in ledger:
        settled = "" if entry.get('settled', True) else " (not settled)"
        lines.append(f"{entry['at'][:16].replace('T', ' ')}  {entry['points']:+.2f}  "
                     f"{entry['rule']} ({entry.get('category') or ''}): "
                     f"{entry.get('reason') or ''}{settled}")
    return "\n".join(lines)
