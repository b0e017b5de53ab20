"""The condition language: what it allows, what it refuses, what a missing field does."""

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retention.rules import expressions
from retention.rules.expressions import (
    MISSING,
    ExpressionError,
    compile_condition,
    register_function,
)

EVENT = SimpleNamespace(id="e1", customer="c1", type="delivery", at=None, source="")
CUSTOMER = SimpleNamespace(capital=42.0, level="watch", purchases=3, spent=120.0,
                           days_since_contact=4.0, consent=True)


def check(source, props=None, customer=CUSTOMER):
    condition = compile_condition(source)
    fast = condition(EVENT, props or {}, customer)
    assert fast == condition.reference(EVENT, props or {}, customer)
    return fast


@pytest.mark.parametrize(("source", "props", "expected"), [
    ('event.type == "delivery" and event.delay_days > 2', {"delay_days": 3}, True),
    ('event.type == "delivery" and event.delay_days > 2', {"delay_days": 1}, False),
    ("event.delay_days > 2", {}, False),
    ("event.delay_days <= 2", {}, False),
    ('event.carrier != "ups"', {}, False),
    ('event.sku not in ["a", "b"]', {}, False),
    ('event.sku not in ["a", "b"]', {"sku": "c"}, True),
    ('event.sku in ["a", "b"]', {"sku": "a"}, True),
    ("event.a in [event.b]", {}, False),
    ("not event.flag", {}, True),
    ("event.amount * 2 > 10", {"amount": 6}, True),
    ("event.amount * 2 > 10", {}, False),
    ("event.amount / 0 > 1", {"amount": 6}, False),
    ('event.amount > "10"', {"amount": 6}, False),
    ("customer.capital < 50 and customer.level == \"watch\"", {}, True),
    ("customer.purchases >= 3 and customer.consent", {}, True),
    ('lower(event.sku) == "abc"', {"sku": "ABC"}, True),
    ("len(event.text) >= 3", {"text": "hello"}, True),
    ("len(event.text) >= 3", {"text": 12}, False),
    ("1 < event.x < 3", {"x": 2}, True),
    ("event.flag == true", {"flag": True}, True),
    ("event.note == null", {"note": None}, True),
    ("event.note == null", {}, False),
    ("event.x % 2 == 1 or event.y // 2 == 3", {"x": 4, "y": 7}, True),
    ("-event.a < 0", {"a": 3}, True),
    ("-event.a < 0", {"a": "3"}, False),
    ('event.qty * event.unit > 10', {"qty": "x", "unit": 400_000_000}, False),
    ('event.a + event.b == "xy"', {"a": "x", "b": "y"}, False),
    ("event.flag + 1 == 2", {"flag": True}, False),
])
def test_evaluation(source, props, expected):
    assert check(source, props) is expected


@pytest.mark.parametrize(("source", "message"), [
    ('__import__("os")', "unknown function"),
    ("event.__class__", "names starting with '_'"),
    ("event.x.y", "only event.FIELD and customer.FIELD"),
    ("os.system", "only event.FIELD and customer.FIELD"),
    ('open("/etc/passwd")', "unknown function 'open'"),
    ("event.a ** 99", "'**' is not allowed"),
    ("customer.capitl > 3", "did you mean 'capital'"),
    ("lenn(event.a)", "did you mean 'len'"),
    ("event.type ==", "invalid condition"),
    ("event.a if event.b else event.c", "is not allowed"),
    ("[x for x in event.items]", "comprehension"),
    ("event.items[0]", "indexing"),
    ("lambda: 1", "lambda"),
    ("len(event.a, key=1)", "keyword arguments"),
    ("foo", "unknown name 'foo'"),
    ("event", "'event' alone"),
    ("event.a is None", "'is'"),
    ("", "non-empty"),
])
def test_refused_at_load(source, message):
    with pytest.raises(ExpressionError) as caught:
        compile_condition(source)
    assert message in str(caught.value)


def test_error_position_points_at_the_culprit():
    with pytest.raises(ExpressionError) as caught:
        compile_condition('event.type == "x" and customer.capitl > 1')
    assert (caught.value.line, caught.value.column) == (1, 23)


def test_event_types_index_the_rule():
    assert compile_condition('event.type == "a" and event.x > 1').event_types == {"a"}
    assert compile_condition('event.type in ["a", "b"]').event_types == {"a", "b"}
    assert compile_condition('event.type == "a" or event.type == "b"').event_types == {"a", "b"}
    assert compile_condition('event.type == "a" or event.x > 1').event_types is None
    assert compile_condition("event.x > 1").event_types is None


def test_registered_functions_are_callable(monkeypatch):
    monkeypatch.setattr(expressions, "FUNCTIONS", dict(expressions.FUNCTIONS))
    register_function("double", lambda value: value * 2)
    assert check("double(event.x) == 8", {"x": 4}) is True
    assert check("double(event.x) == 8", {}) is False
    with pytest.raises(ValueError):
        register_function("_hidden", abs)


def test_missing_is_falsy_and_absorbing():
    assert not MISSING
    assert MISSING + 1 is MISSING
    assert (MISSING == MISSING) is False


# -- the compiled function and the interpreter agree on everything ------------------

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-5, 5),
                   st.sampled_from(["a", "b", "", "10"]), st.lists(st.integers(0, 3)))
FIELDS = ("a", "b", "c")


def expressions_of(depth):
    leaf = st.one_of(
        st.sampled_from([f"event.{f}" for f in FIELDS]),
        st.sampled_from(["1", "0", "2.5", '"a"', '"10"', "true", "null", "customer.capital",
                         "customer.level", "[1, 2]", '["a", "b"]']))
    if depth == 0:
        return leaf
    inner = expressions_of(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(inner, st.sampled_from(["==", "!=", "<", ">=", "in", "not in"]), inner)
        .map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%"]), inner)
        .map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(inner, st.sampled_from(["and", "or"]), inner)
        .map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda e: f"(not {e})"),
        inner.map(lambda e: f"len({e})"),
        st.tuples(inner, inner).map(lambda t: f"[{t[0]}, {t[1]}]"),
    )


@given(expressions_of(3), st.dictionaries(st.sampled_from(FIELDS), VALUES))
def test_compiled_and_interpreted_agree(source, props):
    condition = compile_condition(source)
    assert condition(EVENT, props, CUSTOMER) == condition.reference(EVENT, props, CUSTOMER)


@given(st.text(max_size=40))
def test_any_text_compiles_or_is_refused_clearly(source):
    try:
        condition = compile_condition(source)
    except ExpressionError:
        return
    condition(EVENT, {}, CUSTOMER)


@pytest.mark.parametrize(("source", "column", "message"), [
    ('event.type = "delivery"', 12, "'=' is not a comparison (did you mean '=='?)"),
    ("event.delay_days => 2", 18, "'=>' is not an operator (did you mean '>='?)"),
    ("event.delay_days =< 2", 18, "'=<' is not an operator (did you mean '<='?)"),
    ("event.a > 1 && event.b", 13, "'&&' is not an operator (did you mean 'and'?)"),
    ("event.a || event.b", 9, "'||' is not an operator (did you mean 'or'?)"),
    ("event.a != 2 and !event.b", 18, "'!' is not an operator (did you mean 'not'?)"),
    ("event.a > 1 AND event.b", 13, "'AND' is written in lower case (did you mean 'and'?)"),
    ('event.note == "a=b" and event.x => 2', 33, "did you mean '>='?"),  # not in the text
    ("event.type == delivery", 15,
     "unknown name 'delivery' (did you mean \"delivery\" in quotes? a field is event.delivery)"),
    ("event.type in [delivery, pickup]", 16, "did you mean \"delivery\" in quotes?"),
    ("event.a & event.b", 1, "operator '&' is not allowed (did you mean 'and'?)"),
    ("amount > 3", 1, "read fields as event.amount"),
])
def test_the_usual_slips_get_a_hint(source, column, message):
    with pytest.raises(ExpressionError) as caught:
        compile_condition(source)
    assert message in str(caught.value)
    assert (caught.value.line, caught.value.column) == (1, column)


def test_a_slip_hint_is_placed_in_the_rule_file():
    from retention import RuleFileError, load_texts

    with pytest.raises(RuleFileError) as caught:
        load_texts([("r.yaml", 'rules:\n  a: {when: event.type = "x", points: 1}\n')])
    assert str(caught.value) == ("r.yaml:2:24: invalid condition: '=' is not a comparison "
                                 "(did you mean '=='?)")


def test_built_in_functions_check_their_arguments():
    assert check('lower(event.sku) == "abc"', {"sku": ["ABC"]}) is False
    assert check('upper(event.sku) == "ABC"', {"sku": "abc"}) is True
    assert check("round(event.x, 1) == 2.5", {"x": 2.54}) is True
    assert check("round(event.x, event.d) == 0", {"x": 12, "d": -400}) is False
    assert check("round(event.x) == 1", {"x": True}) is False
