"""The command line: `retention check` and `retention run`, as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from retention.cli import cli

ROOT = Path(__file__).resolve().parent.parent
RETAIL = ROOT / "examples" / "rules" / "retail.yaml"
EVENTS = ROOT / "examples" / "events" / "retail.jsonl"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_check_prints_a_summary_for_a_good_file():
    result = invoke("check", RETAIL)
    assert result.exit_code == 0
    assert result.output == "ok: 1 file: 13 rules, 2 levels, 2 recognition rewards, 6 actions\n"


def test_check_prints_every_error_and_exits_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  late: {when: event.type == \"x\", pionts: -3}\n"
                   "levels:\n  - {name: w, below: 50, then: [nope]}\n")
    result = invoke("check", bad)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f"{bad}:2:35: unknown key 'pionts' in rule 'late' (did you mean 'points'?)"
    assert lines[1].startswith(f"{bad}:4:33: unknown action 'nope'")
    assert lines[-1] == "2 errors; nothing was loaded"
    assert "Traceback" not in result.output


def test_check_of_a_missing_path():
    result = invoke("check", "no/such/rules")
    assert result.exit_code == 1
    assert "no/such/rules:1:1: no such file or folder" in result.output


def test_run_the_bundled_example_summarises_levels_and_decisions():
    result = invoke("run", "--rules", RETAIL, "--json", EVENTS)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["events"] == {"processed": 27390, "duplicates": 0, "dead_lettered": 0}
    levels = summary["customers_by_level"]
    assert set(levels) == {"none", "prospect", "watch", "rupture"}
    assert sum(levels.values()) == 2000
    statuses = {row["status"] for row in summary["decisions"]}
    assert {"pending", "held_out", "suppressed (pressure)", "suppressed (consent)"} <= statuses


def test_run_keeps_bad_lines_and_exits_2(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"id": "1", "customer": "a", "type": "purchase", "at": "2026-01-01T00:00:00Z"}\n'
        "not json\n"
        '{"id": "2", "customer": "a", "type": "complaint", "at": "2026-01-02"}\n'
        '{"id": "1", "customer": "a", "type": "purchase", "at": "2026-01-01T00:00:00Z"}\n')
    dead = tmp_path / "dead.jsonl"
    result = invoke("run", "--rules", RETAIL, "--dead-letter", dead, events)
    assert result.exit_code == 2
    assert f"{events}:2: invalid JSON" in result.output
    assert f"{events}:3: event 2: field 'at'" in result.output
    assert "1 processed, 1 duplicates, 2 dead-lettered" in result.output
    kept = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [k["line"] for k in kept] == [2, 3]
    assert kept[0]["raw"] == "not json"


def test_run_with_broken_rules_exits_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: {a: {when: 'event.type ==', points: 1}}\n")
    result = invoke("run", "--rules", bad, EVENTS)
    assert result.exit_code == 1
    assert "invalid condition" in result.output


def test_the_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "retention.cli", "check", str(RETAIL)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok:")


def test_the_event_generator_is_reproducible(tmp_path):
    script = ROOT / "examples" / "events" / "generate.py"
    outs = []
    for name in ("one.jsonl", "two.jsonl"):
        out = tmp_path / name
        subprocess.run([sys.executable, str(script), "--customers", "40", "--out", str(out)],
                       check=True, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0]
