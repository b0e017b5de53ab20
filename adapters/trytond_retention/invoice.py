"""Credit notes posted become ``return`` events, unless a return sale made them (its
own ``return`` counts that refund already)."""

from trytond.pool import Pool, PoolMeta

from . import facts


class Invoice(metaclass=PoolMeta):
    __name__ = 'account.invoice'

    @classmethod
    def _post(cls, invoices):
        super()._post(invoices)
        Pool().get('retention.event').send([
                (invoice.party, event) for invoice in invoices
                if invoice.type == 'out' and invoice.state == 'posted'
                and (invoice.total_amount or 0) < 0
                and not any(_from_sale(line) for line in invoice.lines)
                for event in facts.credit_events(invoice)])


def _from_sale(line):
    origin = getattr(line, 'origin', None)
    return origin is not None and getattr(origin, '__name__', None) == 'sale.line'
