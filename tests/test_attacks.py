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
def _load_problems(text):
    import pytest

    from retention import RuleFileError, load_texts

    with pytest.raises(RuleFileError) as caught:
        load_texts([("r.yaml", text)])
    return [str(p) for p in caught.value.problems]


def test_a_rule_file_past_one_mebibyte_is_refused_before_it_is_read(tmp_path):
    import pytest

    from retention import RuleFileError, load_rules
    from retention.rules.loader import MAX_BYTES

    comments = "# " + "x" * (MAX_BYTES - 3) + "\n"  # 100 MB of these took 48 s
    assert len(comments) == MAX_BYTES
    (tmp_path / "ok.yaml").write_text(comments)
    assert load_rules(tmp_path / "ok.yaml").rules == ()
    assert _load_problems(comments + "#\n") == [
        f"r.yaml:1:1: too large: this rule file holds {MAX_BYTES + 2:,} bytes; "
        f"a rule set is limited to {MAX_BYTES:,} bytes (1 MiB)"]
    # not even read: bytes that are not text are refused for their size alone
    (tmp_path / "big.yaml").write_bytes(b"\xff" * (MAX_BYTES + 1))
    with pytest.raises(RuleFileError, match=r"big.yaml:1:1: too large"):
        load_rules(tmp_path / "big.yaml")
    # a folder counts its files together
    (tmp_path / "ok.yaml").write_text(comments[: MAX_BYTES // 2])
    (tmp_path / "big.yaml").write_text(comments[: MAX_BYTES // 2 + 1])
    with pytest.raises(RuleFileError, match="the rule files up to this one hold"):
        load_rules(tmp_path)


def test_too_many_rules_are_refused_before_their_conditions_compile():
    from retention import load_texts
    from retention.rules.loader import MAX_ENTRIES

    def rules(n):
        return "rules:\n" + "".join(f"  r{i}: {{when: event.x == {i}}}\n" for i in range(n))

    assert len(load_texts([("r.yaml", rules(MAX_ENTRIES["rules"]))]).rules) == 1000
    assert _load_problems(rules(MAX_ENTRIES["rules"] + 1)) == [
        "r.yaml:1:1: too many rules: a rule set has at most 1,000"]
    levels = "levels:\n" + "".join(f"  - {{name: l{i}, below: {i}}}\n" for i in range(101))
    assert _load_problems(levels) == ["r.yaml:1:1: too many levels: a rule set has at most 100"]


def test_conditions_and_nesting_are_bounded():
    from retention.rules.expressions import MAX_LENGTH

    long = "event.a == 1" + " or event.a == 1" * (MAX_LENGTH // 16)
    assert len(long) > MAX_LENGTH
    assert _load_problems(f"rules:\n  a: {{when: {long}}}\n") == [
        "r.yaml:2:13: a condition is limited to 2,000 characters"]
    deep = "[" * 40 + "]" * 40
    assert _load_problems(f"rules:\n  a: {{when: event.x, then: {deep}}}\n") == [
        "r.yaml:2:58: nested more than 32 levels deep"]




# 6. A lone surrogate in an event is a dead letter, not a lost batch.



# 7. NaN, Infinity and 1e400 are refused at ingest.



# 8. A CSV cell of thousands of digits is a dead letter.



# 9. YAML tags and odd names are load errors.
def test_a_yaml_tag_is_a_load_error_at_its_position():
    python_object = (
        "rules:\n"
        "  a: !!python/object:collections.OrderedDict\n"
        "    when: event.type == \"x\"\n"
        "    points: -1\n")
    assert _load_problems(python_object) == [
        "r.yaml:2:6: YAML tag '!!python/object:collections.OrderedDict' is not allowed in "
        "a rule file: write plain values (quote a text, \"5\")"]
    found = _load_problems("capital: {initial: !!float 70, max: !custom 90}\n")
    assert [p.split(": YAML tag")[0] for p in found] == ["r.yaml:1:20", "r.yaml:1:37"]
    assert "'!!str'" in _load_problems("rules:\n  a: {when: !!str event.x}\n")[0]


def test_names_with_line_breaks_or_punctuation_are_load_errors():
    rule = _load_problems('rules:\n  "r1\\n": {when: event.type == "x"}\n')
    assert rule == ["r.yaml:2:3: 'r1\\n' is not a valid name (letters, digits, _ and -, "
                    "starting with a letter, at most 64 characters)"]
    level = _load_problems('levels:\n  - {name: "watch\\n", below: 50}\n')
    assert level[0].startswith("r.yaml:2:12: 'watch\\n' is not a valid name")
    action = _load_problems('actions:\n  "tag me": {kind: in_purchase}\n')
    assert action[0].startswith("r.yaml:2:3: 'tag me' is not a valid name")
    reward = _load_problems("recognition:\n  " + "r" * 65 + ": {every: 2, when: event.x, "
                            "then: [a]}\nactions:\n  a: {kind: in_purchase}\n")
    assert reward[0].startswith("r.yaml:2:3: '" + "r" * 65 + "' is not a valid name")




# 10. forget leaves no trace.



# 11. Slow clients are dropped.



# 12. deliver --backoff 0 tries each decision once per run.
