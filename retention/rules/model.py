"""A loaded, validated rule set: what the engine runs (built only by the loader)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ..capital import Fade, tie
from .expressions import Condition

CATEGORIES = ("incident", "pull", "satisfaction", "recovery", "contribution")
ACTION_KINDS = ("service", "marketing", "in_purchase")


@attrs.frozen(kw_only=True)
class CapitalConfig:
    initial: float = 70.0
    min: float = 0.0
    max: float = 100.0
    opens_on: frozenset[str] = frozenset({"purchase"})


@attrs.frozen(kw_only=True)
class Silence:
    after: float
    rate_per_day: float
    #: event types that count as a contact; None means every type
    contacts: frozenset[str] | None = None


@attrs.frozen(kw_only=True)
class Licence:
    clean_for: float
    points: float
    up_to: float


@attrs.frozen(kw_only=True)
class Repeat:
    within: float
    factor: float


@attrs.frozen(kw_only=True)
class ActionRef:
    """An action named in a ``then`` list, with its inline parameters."""

    name: str
    params: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class Action:
    name: str
    kind: str
    via: str | None
    params: Mapping[str, Any] = attrs.field(factory=dict)
    #: seconds after which an undelivered decision expires (None: the delivery run's
    #: default); an ``in_purchase`` action is answered in the purchase and never expires
    max_age: float | None = None


@attrs.frozen(kw_only=True)
class Recovery:
    rule: str
    match: str
    within: float
    refund: float = 1.0
    bonus: float = 0.0


@attrs.frozen(kw_only=True)
class Rule:
    name: str
    condition: Condition
    points: float = 0.0
    fade: Fade | None = None
    keep: float = 0.0
    repeat: Repeat | None = None
    category: str = "incident"
    then: tuple[ActionRef, ...] = ()
    recovery: Recovery | None = None
    #: set when another rule recovers this one: the event field that links them
    recovered_by: tuple[str, ...] = ()
    description: str | None = None
    #: the ledger's reason for this rule's points, written once
    reason: str = attrs.field(init=False)
    #: the compiled condition itself, one attribute away on the hot path
    test: Any = attrs.field(init=False, repr=False, eq=False)
    #: the fade as a penalty carries it (see ``capital.FadeKey``)
    fade_key: tuple[Any, ...] | None = attrs.field(init=False, repr=False, eq=False)

    @fade_key.default
    def _fade_key(self) -> tuple[Any, ...] | None:
        return None if self.fade is None else self.fade.key

    @test.default
    def _test(self) -> Any:
        return callable_of(self.condition)

    @reason.default
    def _reason(self) -> str:
        if self.fade is not None and self.points < 0:
            keep = f", {self.keep:.0%} kept" if self.keep else ""
            return f"{self.name}: {self.points:g} points, {self.fade.describe()}{keep}"
        return f"{self.name}: {self.points:+g} points"


@attrs.frozen(kw_only=True)
class Level:
    name: str
    below: float
    rearm: float = 5.0
    then: tuple[ActionRef, ...] = ()
    holdout: float = 0.0
    #: capital under this fires the level, at or over ``rearms_at`` it re-arms: the
    #: thresholds less the tolerance for ties (see ``capital.tie``)
    fires_below: float = attrs.field(init=False, repr=False, eq=False)
    rearms_at: float = attrs.field(init=False, repr=False, eq=False)

    @fires_below.default
    def _fires_below(self) -> float:
        return self.below - tie(self.below)

    @rearms_at.default
    def _rearms_at(self) -> float:
        back = self.below + self.rearm
        return back - tie(back)


@attrs.frozen(kw_only=True)
class Recognition:
    name: str
    then: tuple[ActionRef, ...]
    condition: Condition | None = None
    every: int | None = None
    purchases: int | None = None
    spent: float | None = None
    within: float | None = None
    #: the compiled condition itself (None: every event of the type)
    test: Any = attrs.field(init=False, repr=False, eq=False)

    @test.default
    def _test(self) -> Any:
        return None if self.condition is None else callable_of(self.condition)


def callable_of(condition: Any) -> Any:
    """What to call for a condition: the compiled function of the python matcher, the
    condition itself for another matcher's."""
    return getattr(condition, "function", condition)


@attrs.frozen(kw_only=True)
class Pressure:
    max: int
    per: float
    kinds: frozenset[str] = frozenset({"marketing"})


@attrs.frozen(kw_only=True)
class Consent:
    withdraw_on: frozenset[str] = frozenset({"unsubscribe"})
    restore_on: frozenset[str] = frozenset({"subscribe"})


@attrs.frozen(kw_only=True)
class SourceFile:
    path: str
    text: str
    sha256: str


@attrs.frozen(kw_only=True)
class RuleSet:
    capital: CapitalConfig = CapitalConfig()
    rules: tuple[Rule, ...] = ()
    silence: Silence | None = None
    licence: Licence | None = None
    levels: tuple[Level, ...] = ()
    recognition: tuple[Recognition, ...] = ()
    pressure: Pressure | None = None
    consent: Consent = Consent()
    actions: Mapping[str, Action] = attrs.field(factory=dict)
    sources: tuple[SourceFile, ...] = ()
    #: rules to try for an event type, in file order (rules with no plain type
    #: guard are in every list); built once by the loader
    by_type: Mapping[str, tuple[Rule, ...]] = attrs.field(factory=dict, repr=False)
    any_type: tuple[Rule, ...] = attrs.field(default=(), repr=False)
    recognition_by_type: Mapping[str, tuple[Recognition, ...]] = attrs.field(
        factory=dict, repr=False)
    recognition_any: tuple[Recognition, ...] = attrs.field(default=(), repr=False)
    uses_customer: bool = False
    uses_level: bool = False

    def recognition_for(self, event_type: str) -> tuple[Recognition, ...]:
        """Recognition rewards that can count an event of this type."""
        found = self.recognition_by_type.get(event_type)
        return self.recognition_any if found is None else found

    def summary(self) -> str:
        files = len(self.sources)
        return (f"{files} file{'s' if files != 1 else ''}: {len(self.rules)} rules, "
                f"{len(self.levels)} levels, {len(self.recognition)} recognition rewards, "
                f"{len(self.actions)} actions")
