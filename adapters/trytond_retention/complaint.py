"""Complaints submitted become ``complaint`` events, and done, ``ticket_resolved``."""

from trytond.pool import Pool, PoolMeta

from . import facts


class Complaint(metaclass=PoolMeta):
    __name__ = 'sale.complaint'

    @classmethod
    def wait(cls, complaints):
        super().wait(complaints)
        Pool().get('retention.event').send([
                (c.customer, event) for c in complaints
                for event in facts.complaint_events(c)])

    @classmethod
    def process(cls, complaints):
        super().process(complaints)
        Pool().get('retention.event').send([
                (c.customer, event) for c in complaints if c.state == 'done'
                for event in facts.resolved_events(c)])
