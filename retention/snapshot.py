"""A customer's state as bytes, for the store's snapshots.

Plain values go through marshal: a nested tuple of numbers, strings, lists and
dicts encodes and decodes several times faster than pickling the objects
themselves, and is smaller. A state holding something marshal cannot carry is
pickled whole instead; the first byte says which. (Events and decisions are
kept as bytes already, marshalled or pickled one by one: see ``engine._pack``
and ``engine.pack_decision``.)
"""

from __future__ import annotations

import itertools
import marshal
import pickle
import struct
from collections.abc import Iterable
from typing import Any

from .engine import _MARSHALLED_DECISION, Customer, pack_decision
from .models import Decision

_MARSHAL, _PICKLE = b"M", b"P"
_new = object.__new__


def _decision_in(kept: bytes | tuple[Any, ...] | Decision) -> bytes:
    """A decision as the customer keeps it, from a snapshot: bytes since decisions
    are kept so; before that the tuple these bytes marshal, or (pickled) the object."""
    if isinstance(kept, bytes):
        return kept
    if isinstance(kept, Decision):
        return pack_decision(kept)
    return _MARSHALLED_DECISION + marshal.dumps(kept)


def _window_in(values: Iterable[float]) -> bytearray:
    return bytearray(struct.pack(f"{len(values := tuple(values))}d", *values))


def _times_in(kept: bytes | Iterable[float]) -> bytearray:
    """A window of times from a snapshot: its bytes, or (written before) its numbers."""
    return bytearray(kept) if isinstance(kept, bytes | bytearray) else _window_in(kept)


def _pairs_in(kept: bytes | tuple[Iterable[float], Iterable[float]]) -> bytearray:
    """An `after` reward's window: its bytes, or (written before) (times, amounts)."""
    if isinstance(kept, bytes | bytearray):
        return bytearray(kept)
    return _window_in(itertools.chain.from_iterable(zip(*kept, strict=True)))


def _current(c: Customer) -> Customer:
    """A customer as the engine keeps it, from what a snapshot holds: windows as
    bytes (marshal gives bytes back for a bytearray), or the forms an earlier
    version wrote (lists, a set, decisions as tuples or objects)."""
    if c.windows:
        c.windows = {k: _pairs_in(w) for k, w in c.windows.items()}
    if c.repeats:
        c.repeats = {k: _times_in(w) for k, w in c.repeats.items()}
    if c.pressure is not None:
        c.pressure = _times_in(c.pressure)
    if c.rewarded is not None and not isinstance(c.rewarded, tuple):
        c.rewarded = tuple(sorted(c.rewarded))
    if c.decisions and not all(isinstance(d, bytes) for d in c.decisions.values()):
        c.decisions = {did: _decision_in(d) for did, d in c.decisions.items()}
    return c


def encode(c: Customer) -> bytes:
    """The bytes of a customer's state (its ``log`` included as it is)."""
    try:
        state = None if c.opened_at is None else (
            c.balance, c.opened_at, c.last_contact, c.clean_since, c.steps, c.penalties)
        values = (
            c.id, bytes(c.log), c.last, state, bytes(c.armed), bytes(c.fired), c.level_time,
            c.horizon, c.purchases, c.spent, c.consent, c.counts, c.rewarded,
            c.windows, c.repeats,  # (bytearrays: marshal writes their bytes)
            c.taken,
            c.pressure,
            c.decisions,
            c.next_change, c.scheduled, c.levels_due, c.dirty, c.calm_low, c.calm_high)
        return _MARSHAL + marshal.dumps(values)
    except ValueError:  # a value marshal cannot carry
        return _PICKLE + pickle.dumps(c, protocol=pickle.HIGHEST_PROTOCOL)


def decode(blob: bytes) -> Customer:
    """The customer ``encode`` gave these bytes for."""
    if blob[:1] == _PICKLE:
        return _current(pickle.loads(blob[1:]))
    v = marshal.loads(blob[1:])
    state = v[3]
    if state is None:
        capital: tuple[Any, ...] = (None, 0.0, 0.0, 0.0, 0, ())
    else:
        balance, opened_at, last_contact, clean_since, steps, penalties = state
        capital = (opened_at, balance, last_contact, clean_since, steps, penalties)
    c = _new(Customer)
    c.__setstate__((v[0], bytearray(v[1]), v[2], *capital, bytearray(v[4]), bytearray(v[5]),
                    *v[6:]))
    return _current(c)  # (windows held as bytes become bytearrays there)
