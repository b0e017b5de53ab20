"""The attack list: each hostile input found against the engine, store, server,
sinks and rule files, refused or bounded. Read this module to see what the
project defends against; each section is one finding, numbered as in the issue
that listed them, and each test failed on the code before its fix.
"""


# 1. Replay race: one signed event sent on many connections at once is stored once.



# 2. Email header injection through encoded words.



# 3. Times at the edge of the calendar.



# 4. A condition cannot hang the engine.
def _ledger_rules(engine, customer):
    return {entry.rule for entry in engine.explain(customer)}


def test_round_refuses_digits_that_would_build_an_enormous_power():
    from retention import Engine, load_texts

    engine = Engine(load_texts([("r.yaml", (
        "rules:\n"
        "  rounded:\n"
        "    when: event.type == \"purchase\" and round(event.amount, event.precision) == 0\n"
        "    points: -5\n"))]))
    # round(12, -1000) would compute 10**1000 first; round(12, -10**10) never returns
    for n, digits in enumerate((-1000, -10_000_000_000, 10**30, True, 2.5)):
        engine.process({"id": f"p{n}", "customer": f"c{n}", "type": "purchase",
                        "at": "2026-01-01T00:00:00Z", "amount": 12, "precision": digits})
        assert "rounded" not in _ledger_rules(engine, f"c{n}"), digits
    engine.process({"id": "ok", "customer": "fine", "type": "purchase",
                    "at": "2026-01-01T00:00:00Z", "amount": 12, "precision": -2})
    assert "rounded" in _ledger_rules(engine, "fine")  # round(12, -2) == 0 still matches


def test_round_says_why_it_refuses():
    import pytest

    from retention.plugins.functions import round_

    with pytest.raises(ValueError, match="digits must be a whole number from -308 to 308"):
        round_(12, -10_000_000_000)
    assert round_(12345, -3) == 12000 and round_(1.256, 2) == 1.26 and round_(2.5) == 2


def test_arithmetic_on_whole_numbers_past_64_bits_is_missing():
    from types import SimpleNamespace

    from retention.rules.expressions import compile_condition

    event = SimpleNamespace(id="e", customer="c", type="t", at=None, source="")
    # 190 factors of a 4,000-digit field took a second per event, for one rule
    huge = int("9" * 4000)
    product = compile_condition(" * ".join(["event.a"] * 190) + " > 0")
    assert product(event, {"a": huge}, None) is False
    assert product.reference(event, {"a": huge}, None) is False
    square = compile_condition("event.a * event.a > 0")
    assert square(event, {"a": 2**40}, None) is False  # 2**80: past 64 bits
    assert square(event, {"a": 2**31}, None) is True
    assert compile_condition("event.a + 1 > 0")(event, {"a": huge}, None) is False
    repeat = compile_condition('"ab" * event.n == "abab"')
    assert repeat(event, {"n": 10**9}, None) is False  # text is never repeated




# 5. Rule files are bounded.



# 6. A lone surrogate in an event is a dead letter, not a lost batch.



# 7. NaN, Infinity and 1e400 are refused at ingest.



# 8. A CSV cell of thousands of digits is a dead letter.



# 9. YAML tags and odd names are load errors.



# 10. forget leaves no trace.



# 11. Slow clients are dropped.



# 12. deliver --backoff 0 tries each decision once per run.
