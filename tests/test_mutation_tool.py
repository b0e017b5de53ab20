"""benchmarks/mutation.py makes the mutants it says, one change each, where it is told."""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mutation", ROOT / "benchmarks" / "mutation.py")
mutation = importlib.util.module_from_spec(_spec)
sys.modules["mutation"] = mutation  # (dataclasses look their module up by name)
_spec.loader.exec_module(mutation)

SOURCE = '''\
LIMIT = 1e-6


def drain(state, rate, t):
    """Not mutated: a docstring."""
    idle = (t - state.last) / 86400
    assert rate >= 0
    if rate <= 0 or idle is None:
        return 0.0
    state.total += rate
    return max(0.0, rate * idle) if not state.frozen else clamp(idle, 0, 10)


def untouched(x):
    return x + 1
'''


def test_each_kind_is_made_once_where_it_applies():
    found = {(m.kind, m.what) for m in mutation.mutants(SOURCE, names=("drain", "LIMIT"))}
    assert {
        ("constant", "1e-06 -> 0.0001"),
        ("constant", "86400 -> 86401"),
        ("constant", "0.0 -> 1.0"),
        ("operator", "- -> +"),
        ("operator", "/ -> *"),
        ("operator", "+= -> -="),
        ("comparison", "<= -> <"),
        ("comparison", "is -> is not"),
        ("logic", "or -> and"),
        ("logic", "not state.frozen -> state.frozen"),
        ("clamp", "max(0.0, rate * idle) -> rate * idle"),
        ("clamp", "clamp(idle, ...) -> idle"),
        ("function", "max -> min"),
        ("statement", "state.total += rate -> pass"),
        ("statement", "return 0.0 -> pass"),
    } <= found
    # the clamp keeps the other argument only when one is a constant
    assert ("clamp", "max(0.0, rate * idle) -> 0.0") not in found
    # nothing in the assert is mutated (its `>=` would be the only one)
    assert not any(what.startswith(">=") for _, what in found)


def test_every_mutant_is_one_change_inside_the_chosen_function():
    original = ast.dump(ast.parse(SOURCE))
    found = mutation.mutants(SOURCE, names=("drain",))
    assert found
    untouched = SOURCE[SOURCE.index("def untouched"):]
    for m in found:
        assert m.function == "drain"
        assert ast.dump(ast.parse(m.source)) != original, m.what
        assert m.source.endswith(untouched)  # the rest keeps its text and lines
        assert m.source.startswith("LIMIT = 1e-6\n")
        assert m.code == SOURCE.splitlines()[m.line - 1].strip()
    assert len({m.source for m in found}) == len(found)


def test_a_change_in_dead_code_is_identical_in_bytecode():
    source = "def f(x):\n    if False:\n        return x + 1\n    return x - 1\n"
    found = {m.what: m.identical for m in mutation.mutants(source)}
    assert found["+ -> -"] is True  # compiled away
    assert found["- -> +"] is False


def test_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="no function, method or numeric constant named 'nope'"):
        mutation.mutants(SOURCE, names=("nope",))


def test_the_defaults_name_what_the_modules_have():
    for module, names in mutation.DEFAULT_MODULES.items():
        tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
        chosen = mutation.scopes(tree, names)
        assert chosen
        if names is not None:
            assert {s.name for s in chosen} == set(names)


def test_a_kill_carries_over_to_new_tests_a_survivor_does_not():
    kill = {"suite": "old", "outcome": mutation.KILLED}
    survivor = {"suite": "old", "outcome": mutation.SURVIVED}
    assert mutation.reusable(survivor, "old", recheck_kills=False)
    assert mutation.reusable(kill, "new", recheck_kills=False)
    assert not mutation.reusable(survivor, "new", recheck_kills=False)
    assert not mutation.reusable(kill, "new", recheck_kills=True)
    assert not mutation.reusable(None, "old", recheck_kills=False)


def test_each_equivalent_mutant_names_a_line_that_is_there():
    """benchmarks/equivalents.py explains survivors by their line: one that no longer
    is in its function explains nothing and must go."""
    import equivalents

    for entry in equivalents.EQUIVALENT:
        tree = ast.parse((ROOT / entry.module).read_text(encoding="utf-8"))
        [function] = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                      and node.name == entry.function.rpartition(".")[2]]
        assert entry.code in ast.get_source_segment(
            (ROOT / entry.module).read_text(encoding="utf-8"), function), entry
        assert entry.why and (entry.what == "*" or " -> " in entry.what), entry
