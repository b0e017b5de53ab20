"""Rule cases as data: tests/cases/*.yaml, each a rule file, events and expectations.

A case is a list of steps run in order against one engine:

- ``event: {...}`` processes an event; ``capital_before``/``capital_after``,
  ``ledger`` (points per entry, in order) and ``decisions`` check its outcome;
  ``error`` expects the event to be refused with a message containing the text;
- ``tick: TIME`` runs a tick; ``decisions`` checks what it returned;
- ``capital: {at: TIME, is: X}`` checks capital at a time (customer ``c``
  unless ``customer`` is given), ``level: NAME`` the current level.

Decisions are compared field by field on the fields the case gives, in order.
"""

from pathlib import Path

import pytest
import yaml

from retention import Engine, EventError, load_texts

CASES = sorted(Path(__file__).parent.glob("cases/*.yaml"))


def _load_cases():
    for path in CASES:
        data = yaml.safe_load(path.read_text())
        for case in data["cases"]:
            yield pytest.param(path.stem, case, id=f"{path.stem}:{case['name']}")


def _check_decisions(made, expected, where):
    got = [{k: (d.to_dict()[k]) for k in exp} for d, exp in zip(made, expected, strict=False)]
    assert len(made) == len(expected), f"{where}: decisions {[d.to_dict() for d in made]}"
    for g, exp in zip(got, expected, strict=True):
        for key, value in exp.items():
            if key == "at":
                assert g[key].replace("+00:00", "Z").startswith(value.replace("+00:00", "Z")), \
                    f"{where}: {g} != {exp}"
            else:
                assert g[key] == value, f"{where}: {g} != {exp}"


def _close(got, want, where):
    if want is None:
        assert got is None, f"{where}: {got} != None"
    else:
        assert got == pytest.approx(want, abs=0.01), f"{where}: {got} != {want}"


@pytest.mark.parametrize(("file", "case"), list(_load_cases()))
def test_case(file, case):
    engine = Engine(load_texts([(f"{file}.yaml", case["rules"])]))
    for number, step in enumerate(case["steps"], 1):
        where = f"{case['name']} step {number}"
        if "event" in step:
            event = dict(step["event"])
            event.setdefault("customer", "c")
            if "error" in step:
                with pytest.raises(EventError, match=step["error"]):
                    engine.process(event)
                continue
            outcome = engine.process(event)
            if "duplicate" in step:
                assert outcome.duplicate is step["duplicate"], where
            if "capital_before" in step:
                _close(outcome.capital_before, step["capital_before"], where)
            if "capital_after" in step:
                _close(outcome.capital_after, step["capital_after"], where)
            if "ledger" in step:
                got = [round(e.points, 2) for e in outcome.ledger]
                assert got == pytest.approx(step["ledger"], abs=0.01), f"{where}: {got}"
            if "decisions" in step:
                _check_decisions(list(outcome.decisions), step["decisions"], where)
        elif "tick" in step:
            made = engine.tick(step["tick"])
            if "decisions" in step:
                _check_decisions(made, step["decisions"], where)
        elif "capital" in step:
            spec = step["capital"]
            got = engine.capital(spec.get("customer", "c"), at=spec["at"])
            _close(got, spec["is"], where)
        elif "level" in step:
            assert engine.level(step.get("customer", "c")) == step["level"], where
        elif "next_change" in step:
            from retention.times import parse_instant

            want = parse_instant(step["next_change"]).timestamp()
            assert engine.next_change(step.get("customer", "c")) == pytest.approx(want, abs=1), \
                where
        else:  # pragma: no cover - a mistake in a case file
            raise AssertionError(f"{where}: unknown step {step}")
