"""Plugins: the hooks, the built-ins registered through them, a real distribution
installed with pip and found through the entry point, a broken one skipped."""

import inspect
import json
import os
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

import retention
from retention import hookspecs, plugins
from retention.cli import cli
from retention.errors import RuleFileError
from retention.rules import load_texts

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"
RETAIL = ROOT / "examples" / "rules" / "retail.yaml"
EVENTS = ROOT / "examples" / "events" / "retail.jsonl"
BIN = Path(sys.executable).parent


def hook_names():
    return sorted(name for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
                  if hasattr(f, "retention_spec"))


def test_every_hook_is_documented_in_the_plugin_guide():
    names = hook_names()
    assert set(names) >= {"register_sinks", "register_sources", "register_functions",
                          "register_matchers", "register_commands"}
    guide = GUIDE.read_text()
    for name in names:
        assert re.search(rf"^### {name}\(", guide, re.M), f"{name} is not in docs/plugins.md"
        assert getattr(hookspecs, name).__doc__.strip(), f"{name} has no docstring"


def test_built_in_plugins_are_registered_through_the_hooks():
    rows = {r["name"]: r for r in plugins.listing()}
    for module in plugins.DEFAULT_PLUGINS:
        assert rows[module]["origin"] == "built-in"
        assert rows[module]["status"] == "loaded"
    assert set(plugins.sinks()) >= {"email", "webhook", "log"}
    assert "standard" in plugins.sources()
    assert "len" in plugins.collect("function")
    assert plugins.collect("matcher")["python"].plugin == "retention.plugins.matchers"


def test_plugins_command_lists_in_every_format():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {"retention.plugins.email", "retention.plugins.standard"} <= {r["name"] for r in rows}
    table = CliRunner().invoke(cli, ["plugins"]).output
    assert "sink email" in table and "source standard" in table


class Shout:
    """An inline plugin: a function, a matcher and a command."""

    @retention.hookimpl
    def register_functions(self, register):
        register("shout", lambda value: value.upper() + "!" if isinstance(value, str) else None)

    @retention.hookimpl
    def register_matchers(self, register):
        register("keyword", keyword_matcher)

    @retention.hookimpl
    def register_commands(self, cli):
        import click

        @cli.command("shout-test")
        def shout_test():
            """Say hello."""
            click.echo("HELLO")


class KeywordCondition:
    """A toy matcher: ``when: "purchase of diapers"`` matches the type and the sku."""

    def __init__(self, source):
        words = source.split()
        if len(words) != 3 or words[1] != "of":
            raise ValueError("write: TYPE of SKU")
        self.source = source
        self.kind, self.sku = words[0], words[2]
        self.event_types = frozenset([self.kind])
        self.customer_fields = frozenset()

    def __call__(self, event, props, customer):
        return event.type == self.kind and props.get("sku") == self.sku


def keyword_matcher(source):
    return KeywordCondition(source)


@pytest.fixture
def shout():
    plugin = Shout()
    plugins.pm.register(plugin, name="shout")
    plugins.refresh()
    try:
        yield plugin
    finally:
        plugins.pm.unregister(plugin)
        plugins.refresh()


RULES = """\
capital: {initial: 50, max: 100, opens_on: [purchase]}
rules:
  diapers: {when: "purchase of diapers", matcher: keyword, points: 5, category: satisfaction}
  loud: {when: shout(event.sku) == "WIPES!", points: 1, category: satisfaction}
"""


def test_inline_plugin_adds_a_function_and_a_matcher(shout):
    engine = retention.Engine(load_texts([("r.yaml", RULES)]))
    at = "2026-01-01T00:00:00+00:00"
    out = engine.process({"id": "1", "customer": "c", "type": "purchase", "at": at,
                          "sku": "diapers"})
    assert [e.rule for e in out.ledger] == ["opening", "diapers"]
    out = engine.process({"id": "2", "customer": "c", "type": "purchase", "at": at,
                          "sku": "wipes"})
    assert [e.rule for e in out.ledger] == ["loud"]


def test_unregistered_function_and_matcher_are_load_errors(shout):
    plugins.pm.unregister(shout)
    plugins.refresh()
    with pytest.raises(RuleFileError) as caught:
        load_texts([("r.yaml", RULES)])
    text = str(caught.value)
    assert "r.yaml:3:" in text and "unknown matcher 'keyword'" in text
    assert "r.yaml:4:" in text and "unknown function 'shout'" in text
    plugins.pm.register(shout, name="shout")  # the fixture unregisters it


def test_matcher_failure_is_a_load_error_at_the_rule(shout):
    with pytest.raises(RuleFileError) as caught:
        load_texts([("r.yaml", "capital: {initial: 50}\nrules:\n"
                               "  x: {when: nonsense, matcher: keyword, points: 1}\n")])
    assert "r.yaml:3:" in str(caught.value)
    assert "matcher 'keyword' cannot compile this condition: ValueError: write: TYPE of SKU" \
        in str(caught.value)


def test_misspelt_matcher_gets_a_suggestion(shout):
    expected = r"unknown matcher 'keywrd' \(did you mean 'keyword'\?\)"
    with pytest.raises(RuleFileError, match=expected):
        load_texts([("r.yaml", "capital: {initial: 50}\nrules:\n"
                               "  x: {when: a of b, matcher: keywrd, points: 1}\n")])


def test_plugin_command_joins_the_command_line(shout):
    from retention.cli import _add_plugin_commands

    _add_plugin_commands()
    try:
        result = CliRunner().invoke(cli, ["shout-test"])
        assert result.exit_code == 0 and result.output == "HELLO\n"
    finally:
        cli.commands.pop("shout-test", None)


def test_a_hook_that_raises_is_reported_not_fatal():
    class Broken:
        @retention.hookimpl
        def register_sinks(self, register):
            raise RuntimeError("boom")

    plugin = Broken()
    plugins.pm.register(plugin, name="broken-sinks")
    try:
        assert "email" in plugins.sinks()  # the others still load
        failures = [f for f in plugins.FAILED if f.name == "broken-sinks"]
        assert failures and "RuntimeError: boom" in failures[0].error
    finally:
        plugins.pm.unregister(plugin)
        plugins.FAILED[:] = [f for f in plugins.FAILED if f.name != "broken-sinks"]


# -- a real distribution, installed with pip, found through the entry point -----------

def guide_plugin():
    text = GUIDE.read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)
    toml = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert len(code) == 1 and len(toml) == 1
    return code[0], toml[0]


def install(tmp_path, name, module, code, project):
    """Build and install a distribution into its own folder: the test environment's
    site for the subprocesses that get it on their path."""
    src = tmp_path / f"{name}-src"
    src.mkdir()
    (src / f"{module}.py").write_text(code)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        + project + f'\n[tool.setuptools]\npy-modules = ["{module}"]\n')
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
                   check=True, capture_output=True, timeout=120)
    return site


def run(site, *args, env=None, cwd=None):
    environ = {k: v for k, v in os.environ.items() if k != "RETENTION_LOAD_PLUGINS"}
    environ.update({"PYTHONPATH": str(site), **(env or {})})
    return subprocess.run([str(BIN / "retention"), *map(str, args)], capture_output=True,
                          text=True, env=environ, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    code, toml = guide_plugin()
    site = install(tmp, "ticketdesk", "retention_ticketdesk", code, toml)
    install(tmp, "broken", "retention_broken",
            "import retention_no_such_module\n",
            '[project]\nname = "retention-broken"\nversion = "0.2"\n\n'
            '[project.entry-points.retention]\nbroken = "retention_broken"\n')
    return site


def test_installed_plugin_is_listed_with_its_distribution(installed):
    result = run(installed, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["ticketdesk"]["origin"] == "retention-ticketdesk 0.1"
    assert rows["ticketdesk"]["status"] == "loaded"
    assert rows["ticketdesk"]["provides"] == "sink crm_task, source ticketdesk, function domain"
    # the broken one is reported and skipped; everything else works
    assert rows["broken"]["origin"] == "retention-broken 0.2"
    assert rows["broken"]["status"].startswith("failed: ModuleNotFoundError")
    assert "retention_no_such_module" in rows["broken"]["status"]


def test_installed_plugin_function_is_usable_in_rule_files(installed, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("capital: {initial: 50}\nrules:\n"
                     '  staff: {when: domain(event.email) == "example.com", points: 1,'
                     " category: satisfaction}\n")
    assert run(installed, "check", rules).returncode == 0
    without = run(tmp_path / "nowhere", "check", rules)
    assert without.returncode == 1 and "unknown function 'domain'" in without.stderr
    only_others = run(installed, "check", rules, env={"RETENTION_LOAD_PLUGINS": "broken"})
    assert only_others.returncode == 1


def test_installed_plugin_sink_delivers_and_its_command_runs(installed, tmp_path):
    events = tmp_path / "events.jsonl"
    with EVENTS.open() as source:
        events.write_text("".join(line for _, line in zip(range(4000), source, strict=False)))
    # the events are of 2025: every decision is delivered, none expires
    rules = tmp_path / "retail.yaml"
    rules.write_text(RETAIL.read_text().replace(", max_age: 2d}", "}"))
    db = tmp_path / "r.db"
    ingest = run(installed, "ingest", "--db", db, "--rules", rules, events)
    assert ingest.returncode == 0, ingest.stderr
    with closing(sqlite3.connect(db)) as conn:
        expected = conn.execute("SELECT count(*) FROM decisions WHERE via = 'crm_task'"
                                " AND status = 'pending'").fetchone()[0]
    assert expected > 0
    tasks = tmp_path / "tasks.jsonl"
    deliver = run(installed, "deliver", "--db", db, "--rules", rules,
                  "--route", "email=log", "--route", "crm_tag=log", "--max-age", "3650d",
                  env={"RETENTION_CRM_TASK_PATH": str(tasks),
                       "RETENTION_LOG_PATH": str(tmp_path / "log.jsonl")})
    assert deliver.returncode == 0, deliver.stderr
    written = [json.loads(line) for line in tasks.read_text().splitlines()]
    assert len(written) == expected
    with closing(sqlite3.connect(db)) as conn:
        sent = {i for (i,) in conn.execute(
            "SELECT id FROM decisions WHERE via = 'crm_task' AND status = 'sent'")}
    assert {t["key"] for t in written} == sent
    counted = run(installed, "tasks", tasks)
    assert counted.returncode == 0 and counted.stdout == f"{expected} tasks\n"


@pytest.mark.parametrize("name, value, error", [
    ("tax_rate", 0.2, "registered function 'tax_rate' as a float, which cannot be called"),
    ("", len, "registered a function named '': a name is an identifier not starting with _"),
])
def test_a_plugin_registering_something_unusable_is_reported_and_skipped(name, value, error):
    class Careless:
        @retention.hookimpl
        def register_functions(self, register):
            register("fine_until_here", abs)
            register(name, value)

    plugin = Careless()
    plugins.pm.register(plugin, name="careless")
    try:
        plugins.refresh()  # no exception: the plugin is skipped, the others still count
        from retention.rules import expressions

        assert "len" in expressions.FUNCTIONS
        assert "fine_until_here" not in expressions.FUNCTIONS  # nothing of it is used
        [failure] = [f for f in plugins.FAILED if f.name == "careless"]
        assert failure.error == f"register_functions: {error}"
        statuses = [r["status"] for r in plugins.listing() if r["name"] == "careless"]
        assert statuses == ["loaded", f"failed: register_functions: {error}"]
    finally:
        plugins.pm.unregister(plugin)
        plugins.refresh()
        plugins.FAILED[:] = [f for f in plugins.FAILED if f.name != "careless"]
