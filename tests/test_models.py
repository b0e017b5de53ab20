"""Events at the boundary: the canonical form, CloudEvents, and clear refusals."""

from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retention import Engine, Event, EventError
from retention.models import MAX_NUMBER, _checked

JSON = st.recursive(st.one_of(st.none(), st.booleans(),
                              st.integers(-MAX_NUMBER, MAX_NUMBER), st.text(max_size=8)),
                    lambda inner: st.lists(inner, max_size=3), max_leaves=5)
#: times inside the supported range, whatever their zone's offset
TIMES = st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2199, 12, 30),
                     timezones=st.timezones())


@given(st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=6), "customer": st.text(min_size=1, max_size=6),
     "type": st.sampled_from(["purchase", "delivery"]),
     "at": TIMES.map(lambda d: d.isoformat())},
    optional={"source": st.text(max_size=5), "amount": JSON, "sku": JSON}))
def test_the_quick_path_builds_the_same_event_as_the_constructor(raw):
    quick = _checked(dict(raw), "")
    assert quick is not None
    built = Event(id=raw["id"], customer=raw["customer"], type=raw["type"],
                  at=datetime.fromisoformat(raw["at"]), source=raw.get("source") or "",
                  props={k: v for k, v in raw.items()
                         if k not in ("id", "customer", "type", "at", "source")})
    assert quick == built
    assert Event.from_dict(raw) == built


@given(st.dictionaries(st.sampled_from(["id", "customer", "type", "at", "source", "x"]), JSON))
def test_any_object_is_an_event_or_a_clear_error(raw):
    try:
        Event.from_dict(raw)
    except EventError as exc:
        assert str(exc).startswith("event")


def test_cloudevents_structured_mode():
    event = Event.from_dict({
        "specversion": "1.0", "id": "ce-1", "source": "shop", "type": "purchase",
        "time": "2026-01-05T10:00:00Z", "subject": "c9", "data": {"amount": 40}})
    assert (event.id, event.customer, event.type, event.source) == ("ce-1", "c9", "purchase",
                                                                     "shop")
    assert event.props["amount"] == 40


def test_constructing_with_a_naive_time_is_refused():
    with pytest.raises(EventError, match="no time zone"):
        Event(id="1", customer="c", type="t", at=datetime(2026, 1, 1))


def test_not_an_object():
    with pytest.raises(EventError, match="expected a JSON object"):
        Event.from_dict(["id", 1])


def test_same_id_from_two_sources_are_two_events():
    engine = Engine.from_path(Path(__file__).resolve().parent.parent / "examples/rules/retail.yaml")
    first = engine.process({"id": "1", "customer": "c", "type": "purchase", "source": "shop",
                            "at": "2026-01-01T00:00:00Z"})
    second = engine.process({"id": "1", "customer": "c", "type": "purchase", "source": "pos",
                             "at": "2026-01-02T00:00:00Z"})
    assert not second.duplicate and second.capital_after == first.capital_after + 2


def test_the_engine_builds_outcomes_as_the_class_does():
    from retention.engine import _outcome
    from retention.models import Outcome

    assert _outcome("ev", 1.0, 2.0, ("l",), ("d",)) == Outcome(
        event="ev", capital_before=1.0, capital_after=2.0, ledger=("l",), decisions=("d",))


#: characters, lone UTF-16 surrogates often among them
CHARS = st.one_of(st.characters(max_codepoint=0x7F), st.characters(),
                  st.characters(categories=["Cs"]))
#: JSON-like values, hostile ones included: NaN, infinities, numbers of any size,
#: lone surrogates, in names as in values
HOSTILE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
              st.text(CHARS, max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(CHARS, max_size=3),
                                            inner, max_size=3)),
    max_leaves=6)


@given(st.fixed_dictionaries(
    {"id": st.one_of(st.text(CHARS, min_size=1, max_size=4),
                     st.integers()),
     "customer": st.text(CHARS, min_size=1, max_size=4),
     "type": st.sampled_from(["purchase", "delivery"]),
     "at": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())},
    optional={"source": st.text(CHARS, max_size=3), "amount": HOSTILE,
              "\ud800": HOSTILE, "x": HOSTILE}))
def test_an_accepted_event_is_one_the_store_can_keep(raw):
    """Whatever comes in, an event is either refused with a clear EventError or holds
    only what strict JSON and UTF-8 can keep, at a time inside the supported range;
    the quick path never accepts what the full path refuses."""
    import json

    from retention.times import EARLIEST_TS, LATEST_TS

    quick = _checked(dict(raw), "")
    try:
        event = Event.from_dict(raw)
    except EventError as exc:
        assert str(exc).startswith("event") and quick is None
        str(exc).encode("utf-8")  # the reason itself can be stored and printed
        return
    assert quick is None or quick == event
    assert EARLIEST_TS <= event.ts < LATEST_TS
    text = json.dumps(event.to_dict(), allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
