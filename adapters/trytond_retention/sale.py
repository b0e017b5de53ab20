"""Sales confirmed or processed become ``purchase`` (or ``return``) events."""

from trytond.pool import Pool, PoolMeta

from . import facts


class Sale(metaclass=PoolMeta):
    __name__ = 'sale.sale'

    @classmethod
    def confirm(cls, sales):
        super().confirm(sales)
        cls._retention_send(sales)

    @classmethod
    def process(cls, sales):
        super().process(sales)
        cls._retention_send(sales)

    @classmethod
    def _retention_send(cls, sales):
        Event = Pool().get('retention.event')
        # processed again and again as shipments move: one event per sale
        done = {f"{kind}:{s.id}" for s in sales for kind in ('sale', 'return')}
        done = {e.event_id for e in Event.search([('event_id', 'in', list(done))])}
        Event.send([
                (sale.party, event)
                for sale in sales
                if sale.state in {'confirmed', 'processing', 'done'}
                and not ({f"sale:{sale.id}", f"return:{sale.id}"} & done)
                for event in facts.sale_events(sale)])
