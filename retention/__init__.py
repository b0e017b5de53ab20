"""retention-engine: tolerance capital, rupture thresholds and recognition rewards.

Embed it in a few lines::

    from retention import Engine
    engine = Engine.from_path("examples/rules/retail.yaml")
    outcome = engine.process({"id": "o-1", "customer": "c1", "type": "purchase",
                              "at": "2026-01-05T10:00:00+00:00", "amount": 40})
"""

from .engine import Engine, decision_id, in_holdout
from .errors import EventError, RetentionError, RuleFileError, RuleProblem
from .hookspecs import hookimpl
from .models import Decision, Event, LedgerEntry, Outcome
from .rules import load_rules, load_texts, register_function

__all__ = [
    "Decision",
    "Engine",
    "Event",
    "EventError",
    "LedgerEntry",
    "Outcome",
    "RetentionError",
    "RuleFileError",
    "RuleProblem",
    "decision_id",
    "hookimpl",
    "in_holdout",
    "load_rules",
    "load_texts",
    "register_function",
]

# Last, with every name above defined: a plugin may import ``retention`` itself.
from . import plugins as _plugins

_plugins.load()
