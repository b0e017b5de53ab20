"""The command line: `retention check` and `retention run`, as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from retention import plugins
from retention.cli import cli

ROOT = Path(__file__).resolve().parent.parent
RETAIL = ROOT / "examples" / "rules" / "retail.yaml"
EVENTS = ROOT / "examples" / "events" / "retail.jsonl"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_check_prints_a_summary_for_a_good_file():
    result = invoke("check", RETAIL)
    assert result.exit_code == 0
    assert result.stdout == ("ok: 1 file: 13 rules, 2 levels, 2 recognition rewards, "
                             "6 actions (2 warnings)\n")
    # the CRM sinks of the retail rules come from a plugin where the rules run
    assert [line.split(": warning: ")[1][:40] for line in result.stderr.splitlines()] == [
        "no loaded sink provides via 'crm_tag' (a", "no loaded sink provides via 'crm_task' ("]


def _project(tmp_path, rules):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "apology.txt").write_text("Subject: sorry\n\nSorry.\n")
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    return path


def test_check_warns_about_a_via_no_loaded_sink_provides(tmp_path):
    rules = _project(tmp_path, "rules:\n  a: {when: event.x, then: [call]}\n"
                               "actions:\n  call: {kind: service, via: crm_tsk}\n"
                               "  note: {kind: service, via: webhok}\n")
    result = invoke("check", rules)
    assert result.exit_code == 0, result.output
    # (installed plugins, the adapters among them, add their sinks to the built-ins)
    sinks = ", ".join(sorted(plugins.sinks()))
    assert {"email", "log", "webhook"} <= set(plugins.sinks())
    assert result.stderr.splitlines() == [
        f"{rules}:4:30: warning: no loaded sink provides via 'crm_tsk' (action call); "
        f"sinks: {sinks}. A plugin may provide it where the rules run "
        "(retention plugins), or --route crm_tsk=SINK",
        f"{rules}:5:30: warning: no loaded sink provides via 'webhok' (action note) "
        f"(did you mean 'webhook'?); sinks: {sinks}. A plugin may provide it "
        "where the rules run (retention plugins), or --route webhok=SINK"]
    assert result.stdout.endswith("(2 warnings)\n")


def test_check_takes_the_routes_deliver_takes(tmp_path):
    rules = _project(tmp_path, "rules:\n  a: {when: event.x, then: [call, note]}\n"
                               "actions:\n  call: {kind: service, via: crm_task}\n"
                               "  note: {kind: service, via: crm_tag}\n")
    # routed to loaded sinks: provided, no warning
    result = invoke("check", rules, "--route", "crm_task=webhook", "--route", "crm_tag=log")
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    assert "warning" not in result.stdout
    # a route to a sink that is not loaded is the warning, with the closest name
    result = invoke("check", rules, "--route", "crm_task=webhok", "--route", "crm_tag=log")
    assert result.exit_code == 0, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{rules}:4:30: warning: --route crm_task=webhok (action call):"
                           " no loaded sink is named 'webhok' (did you mean 'webhook'?)")
    # only the routed via is provided: the other still warns
    result = invoke("check", rules, "--route", "crm_task=webhook")
    assert [w.split(": warning: ")[1][:38] for w in result.stderr.splitlines()] == [
        "no loaded sink provides via 'crm_tag' "]
    result = invoke("check", rules, "--route", "crm_task")
    assert result.exit_code == 2 and "write NAME=SINK" in result.output


def test_check_finds_email_templates_where_the_email_sink_does(tmp_path, monkeypatch):
    monkeypatch.delenv("RETENTION_EMAIL_TEMPLATES", raising=False)
    rules = _project(tmp_path, (
        "rules:\n  a: {when: event.x, then: [sorry, {sorry: {template: thanks}}]}\n"
        "  b: {when: event.y, then: [bare, {given: {template: apology}}]}\n"
        "actions:\n  sorry: {kind: marketing, via: email, template: apolgy}\n"
        "  bare: {kind: marketing, via: email}\n"
        "  given: {kind: marketing, via: email}\n"))
    result = invoke("check", rules)
    assert result.exit_code == 1
    folder = tmp_path / "templates"
    assert result.stderr.splitlines() == [
        f"{rules}:5:50: action 'sorry': no template 'apolgy' (did you mean 'apology'?): "
        f"{folder / 'apolgy.txt'} does not exist; templates there: apology",
        f"{rules}:2:28: action 'sorry': no template 'thanks': {folder / 'thanks.txt'} does "
        "not exist; templates there: apology",
        f"{rules}:6:3: action 'bare' goes via email but names no template (template: NAME)",
        "3 errors; the rules are valid, but cannot work as they are"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("apolgy", "thanks", "apology"):
        (elsewhere / f"{name}.txt").write_text("Subject: x\n\nx\n")
    rules.write_text(rules.read_text().replace("[bare, ", "["))
    assert invoke("check", rules, "--templates", elsewhere).exit_code == 0
    monkeypatch.setenv("RETENTION_EMAIL_TEMPLATES", str(elsewhere))
    assert invoke("check", rules).exit_code == 0


def test_check_with_events_warns_about_fields_no_event_carries(tmp_path):
    rules = _project(tmp_path, (
        "rules:\n"
        "  late: {when: event.type == \"delivery\" and event.dealy_days > 2, points: -3}\n"
        "  fine: {when: event.type == \"purchase\" and event.amounts > 2, points: 1}\n"
        "  back: {when: event.type == \"refund\", recovers: late, match: parcel, within: 2d}\n"
        "recognition:\n  big: {after: {or_spent: 100}, then: [gift]}\n"
        "actions:\n  gift: {kind: in_purchase}\n"))
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"id": "1", "customer": "c", "type": "purchase", "at": "2026-01-01T00:00:00Z", '
        '"amounts": 5}\n'
        '{"id": "2", "customer": "c", "type": "delivery", "at": "2026-01-02T00:00:00Z", '
        '"delay_days": 4, "parcel_id": "p"}\nnot json\n')
    result = invoke("check", rules, "--events", events)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"{rules}:2:16: warning: rule 'late' reads event.dealy_days, which no event in "
        f"{events} carries (did you mean 'delay_days'?); it never matches on these events",
        f"{rules}:4:63: warning: rule 'back' reads event.parcel, which no event in {events} "
        "carries (did you mean 'parcel_id'?); it never matches on these events",
        f"{rules}:6:16: warning: recognition 'big' reads event.amount, which no event in "
        f"{events} carries (did you mean 'amounts'?); it never adds up on these events"]
    assert result.stdout.endswith("(3 warnings)\n")
    assert invoke("check", rules).stderr == ""  # without --events: nothing to compare with


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


def test_the_check_examples_of_the_docs_print_what_they_say(monkeypatch):
    import re
    import shlex

    monkeypatch.chdir(ROOT)
    ran = 0
    for doc in ("docs/cli.md", "docs/rules.md"):
        text = (ROOT / doc).read_text()
        for command, printed in re.findall(r"```\n\$ retention (check [^\n]*)\n(.*?)```",
                                           text, flags=re.S):
            args = shlex.split(command)
            if not all(Path(a).exists() for a in args[1:] if not a.startswith("-")) \
                    and args[1] != "nowhere.yaml":
                continue  # a file the text describes, not one of the repository
            result = CliRunner().invoke(cli, args)
            assert result.output == printed, (doc, command)
            ran += 1
    assert ran >= 3
