"""Rule files: validated as a whole, every mistake at file:line:column, nothing half-loaded."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retention import Engine, RuleFileError, load_rules, load_texts

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "rules"


def problems(text, name="r.yaml"):
    with pytest.raises(RuleFileError) as caught:
        load_texts([(name, text)])
    return [str(p) for p in caught.value.problems]


def test_the_examples_load():
    retail = load_rules(EXAMPLES / "retail.yaml")
    assert {r.name for r in retail.rules} >= {"late_delivery", "billing_error", "complaint"}
    assert [lv.name for lv in retail.levels] == ["watch", "rupture"]
    assert load_rules(EXAMPLES / "kaufman.yaml").capital.initial == 150


def test_every_mistake_is_reported_with_its_position():
    text = (
        "capital: {initial: 70, min: 0, max: 100}\n"          # 1
        "rules:\n"                                              # 2
        "  late:\n"                                             # 3
        "    when: event.type == \"d\" and customer.capitl < 3\n"  # 4
        "    pionts: -10\n"                                     # 5
        "    fades_over: 30x\n"                                 # 6
        "  r: {when: event.type == \"t\", recovers: lat, match: id, within: 7d}\n"  # 7
        "levels:\n"                                             # 8
        "  - {name: watch, below: 55, then: [flag_in_crn]}\n"  # 9
        "actions:\n"                                            # 10
        "  flag_in_crm: {kind: service, via: crm_tag}\n"       # 11
    )
    assert problems(text) == [
        "r.yaml:4:33: customer.capitl is not a customer field (did you mean 'capital'?); "
        "fields: capital, level, purchases, spent, days_since_contact, consent",
        "r.yaml:5:5: unknown key 'pionts' in rule 'late' (did you mean 'points'?)",
        "r.yaml:6:17: fades_over: expected a duration like 90d, 12h or 2w, got '30x'",
        "r.yaml:7:42: unknown rule 'lat' (did you mean 'late'?)",
        "r.yaml:9:37: unknown action 'flag_in_crn' (did you mean 'flag_in_crm'?); "
        "declare it under actions: with its kind and via",
    ]


@pytest.mark.parametrize(("text", "message"), [
    ("capital: {initial: 70, min: 100, max: 0}\n", "must be more than min"),
    ("capital: {initial: 170}\n", "must lie between"),
    ("rules:\n  a: {when: event.type == \"x\", points: 5, fades_over: 10d}\n",
     "only negative points fade"),
    ("rules:\n  a: {when: event.type == \"x\", points: -5, keep: 0.5}\n", "keep needs a fade"),
    ("rules:\n  a: {when: event.type == \"x\", points: -5, fades_over: 1d, half_life: 2d}\n",
     "choose one way to fade"),
    ("rules:\n  a: {when: event.type == \"x\", points: -5, fades:}\n", "fades is empty"),
    ("rules:\n  a: {when: event.type == \"x\", points: -5, category: incidnt}\n",
     "did you mean 'incident'"),
    ("rules:\n  a: {points: 5}\n", "needs 'when'"),
    ("rules:\n  a: {when: event.type == \"x\", match: id}\n", "only makes sense with recovers"),
    ("rules:\n  a: {when: event.type == \"x\", points: 3}\n  b: {when: event.type == \"y\", "
     "recovers: a, match: id, within: 2d}\n", "takes no points"),
    ("rules:\n  a: {pattern: [{when: event.type == \"x\"}], points: -3}\n",
     "pattern rules are not available"),
    ("levels:\n  - {name: w, below: 10, holdout: 1}\n", "holdout must be less than 1"),
    ("levels:\n  - {name: w, below: 10}\n  - {name: w, below: 5}\n", "defined twice"),
    ("recognition:\n  r: {every: 2, when: event.type == \"p\", then: []}\n",
     "needs then: [at least one action]"),
    ("recognition:\n  r: {every: 2, after: {purchases: 3}, then: [a]}\nactions:\n"
     "  a: {kind: service, via: x}\n", "exactly one of every"),
    ("actions:\n  a: {kind: servise, via: x}\n", "did you mean 'service'"),
    ("actions:\n  a: {kind: marketing}\n", "needs 'via'"),
    ("pressure: {max: 2, per: 7d, kinds: []}\n", "needs at least one name"),
    ("licence: {clean_for: 30d, points: 5, up_to: 500}\n", "must lie between"),
    ("silence: {after: 10d, rate_per_day: -1}\n", "must be at least 0"),
    ("rules:\n  a: {when: event.type == \"x\"}\nrecognition:\n  a: {every: 1, "
     "when: event.type == \"x\", then: [b]}\nactions:\n  b: {kind: in_purchase}\n",
     "already the name of a rule"),
    ("capitl: {}\n", "did you mean 'capital'"),
    ("rules: [1, 2]\n", "rules must be a mapping"),
    ("- just a list\n", "a rule file is a mapping"),
    ("rules:\n  a: {when: 'x\n", "invalid YAML"),
    ("rules:\n  a: {when: event.type == \"x\"}\n  a: {when: event.type == \"y\"}\n",
     "duplicate key 'a'"),
])
def test_mistakes(text, message):
    found = problems(text)
    assert any(message in p for p in found), found


def test_folders_merge_in_name_order_and_refuse_duplicates(tmp_path):
    (tmp_path / "10-base.yaml").write_text(
        "capital: {initial: 50, min: 0, max: 100}\nrules:\n  a: {when: event.type == \"x\", "
        "points: 1}\nactions:\n  tag: {kind: service, via: crm}\n")
    (tmp_path / "20-more.yaml").write_text(
        "rules:\n  b: {when: event.type == \"y\", points: -1, then: [tag]}\n")
    rules = load_rules(tmp_path)
    assert [r.name for r in rules.rules] == ["a", "b"]
    (tmp_path / "30-dup.yaml").write_text(
        "capital: {initial: 60}\nrules:\n  a: {when: event.type == \"z\", points: 2}\n")
    with pytest.raises(RuleFileError) as caught:
        load_rules(tmp_path)
    text = str(caught.value)
    assert "30-dup.yaml:1:1: 'capital' is already set in" in text
    assert "30-dup.yaml:3:3: rule 'a' is already defined in" in text


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(RuleFileError, match="no such file"):
        load_rules(tmp_path / "nope.yaml")
    with pytest.raises(RuleFileError, match=r"no rule files \(\*.yaml\)"):
        load_rules(tmp_path)


def test_a_broken_file_changes_nothing_in_a_running_engine(tmp_path):
    engine = Engine.from_path(EXAMPLES / "retail.yaml")
    engine.process({"id": "p", "customer": "c", "type": "purchase",
                    "at": "2026-01-01T00:00:00Z", "amount": 10})
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules:\n  a: {when: event.type == , points: 1}\n")
    before = engine.rules
    with pytest.raises(RuleFileError):
        engine.use_rules(broken)
    assert engine.rules is before
    assert engine.capital("c") == 72


KEYS = st.sampled_from(["capital", "rules", "levels", "silence", "licence", "pressure",
                        "recognition", "actions", "when", "points", "below", "then", "x"])
SCALARS = st.one_of(st.integers(-5, 200), st.text(max_size=12), st.booleans(), st.none(),
                    st.sampled_from(["30d", "5%", 'event.type == "x"', "[", "{", ":"]))
TREES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


@given(TREES)
def test_generated_rule_files_load_or_fail_clearly(tree):
    import yaml

    text = yaml.safe_dump(tree) if not isinstance(tree, str) else tree
    try:
        load_texts([("gen.yaml", text)])
    except RuleFileError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.line >= 1 and problem.column >= 1 and problem.message


@given(st.text(max_size=80))
def test_any_text_loads_or_fails_clearly(text):
    try:
        load_texts([("gen.yaml", text)])
    except RuleFileError as exc:
        assert exc.problems


def test_an_empty_levels_key_is_an_error():
    assert any("levels is empty" in p for p in problems("levels:\n"))


def test_the_json_schema_names_exactly_the_keys_the_loader_accepts():
    import json

    from retention.rules.loader import KEYS, TOP_KEYS

    schema = json.loads((Path(__file__).resolve().parent.parent / "retention" / "rules"
                         / "schema.json").read_text())
    defs = schema["$defs"]
    props = schema["properties"]
    found = {
        "capital": props["capital"]["properties"],
        "rule": defs["rule"]["properties"],
        "fades": defs["rule"]["properties"]["fades"]["properties"],
        "repeat": defs["rule"]["properties"]["repeat"]["properties"],
        "level": defs["level"]["properties"],
        "recognition": defs["recognition"]["properties"],
        "after": defs["recognition"]["properties"]["after"]["properties"],
        "silence": props["silence"]["properties"],
        "licence": props["licence"]["properties"],
        "pressure": props["pressure"]["properties"],
        "consent": props["consent"]["properties"],
        "action": defs["action"]["properties"],
    }
    assert {k: sorted(v) for k, v in found.items()} == {k: sorted(v) for k, v in KEYS.items()}
    assert sorted(props) == sorted(TOP_KEYS)


def test_the_schema_is_shipped_with_the_package():
    from importlib.resources import files

    assert (files("retention.rules") / "schema.json").is_file()


def test_dates_in_a_rule_file_are_plain_text():
    rules = load_texts([("r.yaml", "actions:\n  a: {kind: in_purchase, params: "
                                   "{since: 2026-01-01, code: =}}\n")])
    assert rules.actions["a"].params == {"since": "2026-01-01", "code": "="}


@pytest.mark.parametrize(("text", "only"), [
    # the misspelt points read as 0, which "only negative points fade" used to report
    ("rules:\n  late:\n    when: event.type == \"d\"\n    pionts: -10\n    fades_over: 30d\n",
     "r.yaml:4:5: unknown key 'pionts' in rule 'late' (did you mean 'points'?)"),
    ("rules:\n  a: {wehn: event.type == \"x\", points: 1}\n",
     "r.yaml:2:7: unknown key 'wehn' in rule 'a' (did you mean 'when'?)"),
    ("rules:\n  a: {when: event.x, points: -1, fades_ovr: 3d, keep: 0.5}\n",
     "r.yaml:2:34: unknown key 'fades_ovr' in rule 'a' (did you mean 'fades_over'?)"),
    ("rules:\n  a: {when: event.x, points: -1, fades: {rat: 5%, per: 3d}}\n",
     "r.yaml:2:42: unknown key 'rat' in fades (did you mean 'rate'?)"),
    ("rules:\n  a: {when: event.x, pionts: -1}\n  b: {when: event.y, recovers: a, "
     "match: id, within: 2d}\n",
     "r.yaml:2:22: unknown key 'pionts' in rule 'a' (did you mean 'points'?)"),
    ("rules:\n  a: {when: event.x, points: -1}\n  b: {when: event.y, recover: a, "
     "match: id, within: 2d}\n",
     "r.yaml:3:22: unknown key 'recover' in rule 'b' (did you mean 'recovers'?)"),
    ("capital: {initial: 150, mx: 200}\nlicence: {clean_for: 10d, points: 1}\n",
     "r.yaml:1:25: unknown key 'mx' in capital (did you mean 'max'?)"),
    ("capitol: {initial: 150, max: 200}\nlicence: {clean_for: 10d, points: 1}\n",
     "r.yaml:1:1: unknown key 'capitol' in the rule file (did you mean 'capital'?)"),
    ("levels:\n  - {nmae: watch, below: 50}\n",
     "r.yaml:2:6: unknown key 'nmae' in level (did you mean 'name'?)"),
    ("recognition:\n  r: {evry: 2, when: event.x, then: [a]}\nactions:\n  a: {kind: in_purchase}\n",
     "r.yaml:2:7: unknown key 'evry' in recognition 'r' (did you mean 'every'?)"),
    ("recognition:\n  r: {after: {purchase: 3}, then: [a]}\nactions:\n  a: {kind: in_purchase}\n",
     "r.yaml:2:15: unknown key 'purchase' in after (did you mean 'purchases'?)"),
    ("recognition:\n  r: {every: 2, when: event.x, thne: [a]}\n"
     "actions:\n  a: {kind: in_purchase}\n",
     "r.yaml:2:32: unknown key 'thne' in recognition 'r' (did you mean 'then'?)"),
    ("rules:\n  a: {when: event.x, then: [tag]}\naction:\n  tag: {kind: service, via: crm}\n",
     "r.yaml:3:1: unknown key 'action' in the rule file (did you mean 'actions'?)"),
    ("actions:\n  tag: {kind: service, vai: crm}\n",
     "r.yaml:2:24: unknown key 'vai' in action 'tag' (did you mean 'via'?)"),
    ("silence: {after: 10d, rate_per_dy: 1}\n",
     "r.yaml:1:23: unknown key 'rate_per_dy' in silence (did you mean 'rate_per_day'?)"),
])
def test_a_misspelt_key_is_one_error_with_no_knock_on(text, only):
    assert problems(text) == [only]


def test_a_missing_key_is_still_reported_beside_an_unrelated_unknown_one():
    assert problems("rules:\n  a: {points: 1, colour: red}\n") == [
        "r.yaml:2:6: rule 'a' needs 'when'",
        "r.yaml:2:18: unknown key 'colour' in rule 'a'",
    ]


def test_the_json_schema_has_the_loader_limits_and_name_pattern():
    import json
    import re

    from retention.rules.expressions import MAX_LENGTH
    from retention.rules.loader import MAX_ENTRIES, MAX_LEVELS, valid_name

    schema = json.loads((Path(__file__).resolve().parent.parent / "retention" / "rules"
                         / "schema.json").read_text())
    defs, props = schema["$defs"], schema["properties"]
    pattern = re.compile(defs["name"]["pattern"])
    for name in ("late_delivery", "r-1", "a" * 64, "a" * 65, "r1\n", "1r", "tag me", "café",
                 "_x", ""):
        assert (pattern.search(name) is not None) is valid_name(name), name
    assert defs["condition"]["maxLength"] == MAX_LENGTH
    assert {k: props[k]["maxProperties"] for k in MAX_ENTRIES} == MAX_ENTRIES
    assert props["levels"]["maxItems"] == MAX_LEVELS
    for section in ("rules", "recognition", "actions"):
        assert props[section]["propertyNames"] == {"$ref": "#/$defs/name"}
    assert defs["level"]["properties"]["name"] == {"$ref": "#/$defs/name"}


def test_a_reference_to_a_refused_name_is_no_second_error():
    assert problems('rules:\n  "late one": {when: event.x, points: -1}\n'
                    '  back: {when: event.y, recovers: late one, match: id, within: 1d}\n'
                    'levels:\n  - {name: w, below: 5, then: ["tag me"]}\n'
                    'actions:\n  "tag me": {kind: in_purchase}\n') == [
        "r.yaml:2:3: 'late one' is not a valid name (letters, digits, _ and -, starting "
        "with a letter, at most 64 characters)",
        "r.yaml:7:3: 'tag me' is not a valid name (letters, digits, _ and -, starting "
        "with a letter, at most 64 characters)"]


def test_a_merge_key_is_refused_at_its_position():
    assert problems("actions:\n  a: &b {kind: service, via: x}\n  c: {<<: *b, via: y}\n") == [
        "r.yaml:3:7: merge keys (<<) are not supported in rule files: write the keys out"]


def test_a_lone_surrogate_in_a_given_text_is_a_load_error():
    assert problems('rules: {}\ndescription: "ab\ud800"\n') == [
        "r.yaml:2:17: not text: a lone surrogate '\\ud800'"]


def test_the_examples_are_valid_under_the_json_schema_and_mistakes_are_not():
    import json

    import yaml

    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).resolve().parent.parent / "retention" / "rules"
                         / "schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for example in ("retail.yaml", "kaufman.yaml"):
        assert list(validator.iter_errors(yaml.safe_load((EXAMPLES / example).read_text()))) == []
    wrong = {"rules": {"r1\n": {"when": "event.x"}, "a": {"when": "event.x", "recovers": "b"}},
             "actions": {"c": {"kind": "service"}},
             "recognition": {"r": {"every": 2, "then": ["c"]}},
             "levels": [{"name": "w", "below": 5, "holdout": 1}]}
    assert sorted("/".join(map(str, e.path)) for e in validator.iter_errors(wrong)) == [
        "actions/c", "levels/0/holdout", "recognition/r", "rules", "rules/a", "rules/a"]


@pytest.mark.parametrize("rate", ["0%", "100%", "1.5"])
def test_a_fade_rate_must_be_between_0_and_100_percent(rate):
    """A trace losing 100% of itself is gone the moment after its incident: refused,
    as a rate of 0 (which never fades) is."""
    found = problems("capital: {initial: 70}\nrules:\n  late: {when: event.type == \"late\", "
                     f"points: -5, fades: {{rate: {rate}, per: 7d}}}}\n")
    assert len(found) == 1 and "rate must be" in found[0], found
