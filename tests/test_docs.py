"""The docs run as written and show what they do: every ```python block of README.md
and docs/*.md runs, every value and output it shows is compared with what it gives,
and every ```yaml block loads as a rule file (or fails with the errors it shows).

Conventions for doc authors
---------------------------
Python blocks (```python):

- The python blocks of one page run in order, in one namespace (as in a notebook), in
  a fresh temporary folder. The folder holds the repository's ``examples/`` (so
  ``examples/rules/kaufman.yaml`` reads as in a clone) and what the page says it
  needs: ``FILES`` below makes it (a folder made by ``retention init``, the example
  events as ``events.jsonl``).
- A value is shown as a trailing comment on an expression statement; the comment is
  exactly the ``repr`` of the value, every time the line runs::

      out.capital_before, out.capital_after   # (150.0, 50.0)

  So a trailing comment on an expression statement is never prose: put prose on its
  own line, or after an assignment (``report = store.ingest(...)   # why``). Comments
  on other lines are prose.
- What a block prints is shown, exactly, in a ```text block right after it (nothing
  but blank lines between them). A block that prints shows what it prints; a
  ```text block always follows a python block.
- A block that cannot run (a fragment of a host's code) is fenced ```python no-run
  and listed in ``NOT_RUN`` with the reason. Keep these rare.
- ``AFTER`` uses what a page's blocks built where printing it would not show it
  working: the ASGI app of docs/serve.md is served on loopback and spoken to.

YAML blocks (```yaml):

- A yaml block is a complete rule file: it loads with ``load_texts``.
- A yaml block fenced ```yaml excerpt is a part of ``examples/rules/retail.yaml``
  (```yaml excerpt FILE: of FILE), which loads: every key and value it shows is the
  file's, where the file has that key (at the top, or at any depth for a fragment
  such as ``then: [...]``); a list shows all of the file's list, in order.
- A rule file meant to fail is fenced ```yaml error NAME: the test writes it to NAME
  (with the files ``ERROR_FILES`` adds, as the page says), and the page's
  ``$ retention check ...`` block that names NAME or its folder shows the outcome,
  which ``load_rules`` (its errors) and the command line (its whole output) give
  exactly.

JSON blocks (```json) parse.

Shell blocks: a block of one ``$ retention ...`` command listed in ``SHELL_RUN`` (on the
repository's examples, or on a folder of them made as the page says) runs too, and
prints what the page shows; a line ``...`` stands for lines left out.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shutil
import tokenize
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from click.testing import CliRunner

from retention import RuleFileError, load_rules, load_texts
from retention.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
LATE_DELIVERY = "[('late_delivery', -10.0), ('very_late_delivery', -6.0)]"

# (page, first line of the block's code) -> why the block is not run
NOT_RUN: dict[tuple[str, str], str] = {}


# -- reading the pages -----------------------------------------------------------------

class Block(NamedTuple):
    doc: str                  # the page, relative to the repository
    line: int                 # the page's line of the block's first line of code
    lang: str                 # the word after the fence: python, yaml, text, "" ...
    marks: tuple[str, ...]    # the words after it: no-run, excerpt, error NAME
    text: str
    gap: str                  # the page's text between the block before and this one


def blocks(doc: str) -> list[Block]:
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = gap_from = 0
    while i < len(lines):
        fence = re.fullmatch(r"```(?!`)(\w*)(.*)", lines[i])
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        found.append(Block(doc, i + 2, fence[1], tuple(fence[2].split()),
                           "".join(line + "\n" for line in lines[i + 1:end]),
                           "\n".join(lines[gap_from:i])))
        i = gap_from = end + 1
    return found


def all_blocks(lang: str) -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc) if b.lang == lang]


def python_blocks(path: Path) -> list[str]:
    return [b.text for b in blocks(str(path.relative_to(ROOT))) if b.lang == "python"]


def block_id(block: Block) -> str:
    return f"{block.doc}:{block.line}"


# -- running python blocks -------------------------------------------------------------

def trailing_comments(block: Block) -> dict[int, str]:
    """Page line -> the text of the comment that ends it after some code."""
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(block.text).readline):
        if token.type == tokenize.COMMENT and token.line[:token.start[1]].strip():
            comments[token.start[0] + block.line - 1] = token.string[1:].strip()
    return comments


class _Show(ast.NodeTransformer):
    """Wraps each expression statement that ends on a line with a trailing comment in
    ``__shown__(line, value)``, which compares the value with the comment."""

    def __init__(self, comments: dict[int, str]):
        self.comments = comments
        self.shown: dict[int, str] = {}

    def visit_Expr(self, node: ast.Expr) -> ast.Expr:
        if node.end_lineno not in self.comments:
            return node
        self.shown[node.end_lineno] = self.comments[node.end_lineno]
        call = ast.Call(ast.Name("__shown__", ast.Load()),
                        [ast.Constant(node.end_lineno), node.value], [])
        return ast.copy_location(ast.Expr(call), node)


def short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def run_python(block: Block, namespace: dict[str, Any]) -> tuple[str, list[str]]:
    """Run one block; returns what it printed and the shown values it did not give."""
    tree = ast.parse(block.text)
    ast.increment_lineno(tree, block.line - 1)
    show = _Show(trailing_comments(block))
    tree = ast.fix_missing_locations(show.visit(tree))
    problems: list[str] = []
    ran: set[int] = set()

    def shown(line: int, value: Any) -> Any:
        ran.add(line)
        if repr(value) != show.shown[line]:
            hint = (" (a trailing comment shows the value of an expression; printed "
                    "output goes in a ```text block after the code)") if value is None else ""
            problems.append(f"{block.doc}:{line}: shows {show.shown[line]}, "
                            f"the code gives {short(repr(value))}{hint}")
        return value

    namespace["__shown__"] = shown
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(tree, str(ROOT / block.doc), "exec"), namespace)
    problems += [f"{block.doc}:{line}: shows {show.shown[line]}, but the line never ran"
                 for line in sorted(set(show.shown) - ran)]
    return printed.getvalue(), problems


def output_shown_after(page: list[Block], index: int) -> str | None:
    after = page[index + 1] if index + 1 < len(page) else None
    if after is not None and after.lang == "text" and not after.gap.strip():
        return after.text
    return None


# -- what the pages need ---------------------------------------------------------------

def init_folder(folder: Path) -> None:
    """``retention init`` in the folder: rules/retail.yaml, its schema and retention.db."""
    result = CliRunner().invoke(cli, ["init", str(folder)])
    assert result.exit_code == 0, result.output


def example_events(folder: Path) -> None:
    shutil.copy(ROOT / "examples" / "events" / "retail.jsonl", folder / "events.jsonl")


FILES = {
    "docs/store.md": [init_folder, example_events],
    "docs/serve.md": [init_folder],
}


def prepare(folder: Path, doc: str) -> Path:
    (folder / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    for make in FILES.get(doc, []):
        make(folder)
    return folder


def serve_the_mounted_app(namespace: dict[str, Any], folder: Path) -> None:
    """docs/serve.md's host app, under uvicorn on loopback: the mounted engine starts
    on its first request, takes an event, answers the customer, and the host's
    lifespan closes the database."""
    from tests.test_server import serving

    with serving(namespace["app"]) as server:
        assert server.get("/retention/health").body == {"status": "ok"}
        posted = server.post("/retention/events", {
            "id": "p1", "customer": "ann", "type": "purchase",
            "at": "2026-01-05T10:00:00+00:00", "amount": 40})
        assert posted.status == 200, posted.body
        assert posted.body["new"] == 1
        ann = server.get("/retention/customers/ann?at=2026-01-05T10:00:00Z")
        assert ann.status == 200, ann.body
        assert ann.body["capital"] == 72.0
    assert not (folder / "retention.db-wal").exists()  # stopped by the host's lifespan


AFTER = {"docs/serve.md": serve_the_mounted_app}


# -- the tests -------------------------------------------------------------------------

@pytest.mark.parametrize("doc", [d for d in DOCS
                                 if any(b.lang == "python" for b in blocks(d))])
def test_python_blocks_run_and_show_what_they_give(doc, tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("RETENTION_")]:
        monkeypatch.delenv(name)  # the pages show the defaults
    monkeypatch.chdir(prepare(tmp_path, doc))
    namespace: dict[str, Any] = {"__name__": "__main__"}
    page = blocks(doc)
    problems = []
    for index, block in enumerate(page):
        if block.lang != "python" or "no-run" in block.marks:
            continue
        printed, wrong = run_python(block, namespace)
        problems += wrong
        shown = output_shown_after(page, index)
        if shown is None and printed:
            problems.append(f"{block_id(block)}: the block prints {short(repr(printed))}, "
                            "but no ```text block after it shows it")
        elif shown is not None and printed.rstrip("\n") != shown.rstrip("\n"):
            problems.append(f"{block_id(block)}: the block prints\n{printed}"
                            f"but the page shows\n{shown}")
    if doc in AFTER:
        AFTER[doc](namespace, tmp_path)
    assert not problems, "\n".join(problems)


def test_the_shown_values_are_compared():
    """The convention catches a wrong value, a print shown as a value, a line that never
    runs and prose after an expression: each is a problem, not a pass."""
    block = Block("demo.md", 10, "python", (), "\n".join([
        "x = 2   # prose after an assignment",
        "x + 1   # 3",
        "x * 2   # 5",
        "print(x)   # 2",
        "if x > 5:",
        "    x   # 2",
        "len('ab')   # the length",
        "print('ok')",
    ]) + "\n", "")
    printed, problems = run_python(block, {})
    assert printed == "2\nok\n"
    assert problems == [
        "demo.md:12: shows 5, the code gives 4",
        "demo.md:13: shows 2, the code gives None (a trailing comment shows the value of "
        "an expression; printed output goes in a ```text block after the code)",
        "demo.md:16: shows the length, the code gives 2",
        "demo.md:15: shows 2, but the line never ran",
    ]


def test_text_blocks_follow_python_blocks():
    for doc in DOCS:
        page = blocks(doc)
        for index, block in enumerate(page):
            if block.lang == "text":
                assert index and page[index - 1].lang == "python" and not block.gap.strip(), (
                    f"{block_id(block)}: a ```text block shows the output of the python "
                    "block right before it")


def test_every_python_block_runs_or_says_why():
    marked = {(b.doc, b.text.splitlines()[0]): b for b in all_blocks("python")
              if "no-run" in b.marks}
    assert set(marked) == set(NOT_RUN), (
        "a ```python no-run block is listed in NOT_RUN with the reason, and only those")
    for block in all_blocks("python"):
        assert set(block.marks) <= {"no-run"}, f"{block_id(block)}: unknown mark {block.marks}"


SECTIONS = ("capital:", "rules:", "silence:", "licence:", "levels:", "recognition:",
            "pressure:", "consent:", "actions:")


def test_rule_files_are_fenced_as_yaml():
    """A rule file shown in a plain block would escape the checks below."""
    for block in all_blocks(""):
        assert not block.text.startswith(SECTIONS), (
            f"{block_id(block)}: fence a rule file as ```yaml (or ```yaml error NAME)")


@pytest.mark.parametrize("block", [b for b in all_blocks("yaml") if not b.marks],
                         ids=block_id)
def test_yaml_rule_files_load(block):
    load_texts([(block_id(block), block.text)])


@pytest.mark.parametrize("block", all_blocks("json"), ids=block_id)
def test_json_blocks_parse(block):
    json.loads(block.text)


# an error example's other files, as its page describes them: name -> repository file
ERROR_FILES = {
    "rules/20-extra.yaml": {"rules/10-retail.yaml": "examples/rules/retail.yaml"},
}


def check_block_for(block: Block, name: str) -> Block:
    """The page's ``$ retention check X`` block where X is the file or its folder."""
    for other in blocks(block.doc):
        command = other.text.splitlines()[0].split() if other.text.strip() else []
        if command[:3] == ["$", "retention", "check"] and command[3].rstrip("/") in (
                name, str(Path(name).parent)):
            return other
    raise AssertionError(f"{block_id(block)}: no `$ retention check {name}` block shows "
                         "its errors")


def within(part: Any, whole: Any) -> bool:
    """``part`` shows only what ``whole`` holds: a mapping some of its keys, each with
    the same value; a list all of its items."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(
            key in whole and within(value, whole[key]) for key, value in part.items())
    if isinstance(part, list):
        return (isinstance(whole, list) and len(part) == len(whole)
                and all(within(a, b) for a, b in zip(part, whole, strict=True)))
    return type(part) is type(whole) and part == whole


def mappings(value: Any):
    if isinstance(value, dict):
        yield value
    for inner in (value.values() if isinstance(value, dict)
                  else value if isinstance(value, list) else []):
        yield from mappings(inner)


@pytest.mark.parametrize("block", [b for b in all_blocks("yaml") if b.marks[:1] == ("excerpt",)],
                         ids=block_id)
def test_yaml_excerpts_are_what_their_rule_file_says(block):
    import yaml

    source = ROOT / (block.marks[1] if len(block.marks) > 1 else "examples/rules/retail.yaml")
    load_rules(source)
    whole = yaml.safe_load(source.read_text(encoding="utf-8"))
    part = yaml.safe_load(block.text)
    assert isinstance(part, dict) and part, f"{block_id(block)}: an excerpt shows keys"
    assert any(within(part, inner) for inner in mappings(whole)), (
        f"{block_id(block)}: this is not what {source.relative_to(ROOT)} says")


@pytest.mark.parametrize("block", [b for b in all_blocks("yaml")
                                   if b.marks[:1] not in ((), ("excerpt",))],
                         ids=block_id)
def test_yaml_error_examples_fail_with_the_errors_shown(block, tmp_path, monkeypatch):
    assert block.marks[0] == "error" and len(block.marks) == 2, (
        f"{block_id(block)}: a yaml block is marked `excerpt [FILE]` or `error NAME`")
    name = block.marks[1]
    for extra, source in {name: None, **ERROR_FILES.get(name, {})}.items():
        (tmp_path / extra).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / extra).write_text(block.text if source is None
                                      else (ROOT / source).read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)
    command, *shown = check_block_for(block, name).text.splitlines()
    with pytest.raises(RuleFileError) as raised:
        load_rules(command.split()[3])
    assert str(raised.value).splitlines() == shown[:-1]
    result = CliRunner().invoke(cli, command.split()[2:])
    assert (result.exit_code, result.output.splitlines()) == (1, shown)


def example_store(folder: Path) -> None:
    """``retention init``, then ``retention ingest examples/events/retail.jsonl``."""
    init_folder(folder)
    result = CliRunner().invoke(cli, ["ingest", "--db", str(folder / "retention.db"),
                                      str(ROOT / "examples" / "events" / "retail.jsonl")])
    assert result.exit_code == 0, result.output


def huge_file(folder: Path) -> None:
    """A rule file of 32 MiB (sparse: the limit is checked before the file is read)."""
    with (folder / "huge.yaml").open("wb") as huge:
        huge.truncate(32 * 1024 * 1024)


# a command the page runs -> what its folder holds first (nothing: the repository)
SHELL_RUN = {
    "$ retention check examples/": None,
    "$ retention check nowhere.yaml": None,
    "$ retention run --rules examples/": None,
    "$ retention customer c-0830 ": example_store,
    "$ retention check huge.yaml": huge_file,
    "$ retention plugins": None,
}


def example_commands() -> list[Block]:
    """Shell blocks of one ``retention`` command that needs only the repository's
    examples (or a missing file), with the output the page shows."""
    return [b for b in all_blocks("") if b.text.startswith(tuple(SHELL_RUN))]


def shows(output: list[str], shown: list[str]) -> bool:
    """The output is what is shown, where a line ``...`` stands for any lines."""
    pattern = "".join(".*" if line == "..." else re.escape(line + "\n") for line in shown)
    return re.fullmatch(pattern, "".join(line + "\n" for line in output), re.S) is not None


@pytest.mark.parametrize("block", example_commands(), ids=block_id)
def test_commands_on_the_examples_print_what_the_page_shows(block, tmp_path, monkeypatch):
    command, *shown = block.text.splitlines()
    assert "\n$ " not in block.text, f"{block_id(block)}: one command per block"
    make = next(make for start, make in SHELL_RUN.items() if command.startswith(start))
    if make is None:
        monkeypatch.chdir(ROOT)
    else:
        monkeypatch.chdir(prepare(tmp_path, block.doc))
        make(tmp_path)
    result = CliRunner().invoke(cli, command.split()[2:])
    assert shows(result.output.splitlines(), shown), (
        f"{block_id(block)}: the command prints\n{result.output}")
    assert result.exit_code == (1 if shown[-1].endswith("nothing was loaded") else 0)


def test_an_elided_output_still_shows_its_lines_in_order():
    assert shows(["a", "b", "c", "d"], ["...", "b", "...", "d"])
    assert not shows(["a", "b", "c", "d"], ["...", "c", "...", "b"])
    assert not shows(["a", "b"], ["a"])


def test_readme_library_examples_run_from_an_installed_wheel(tmp_path):
    """Installed from a wheel, far from the repository, the README's examples run: the
    bundled rules and events come from the package (``retention.examples``)."""
    import subprocess
    import sys
    import zipfile

    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("retention_engine-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "\n".join([
        "import retention",
        f"assert retention.__file__.startswith({str(site)!r}), retention.__file__",
        *python_blocks(ROOT / "README.md")])
    ran = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(site),
                                                      "PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0, ran.stderr
    assert LATE_DELIVERY in ran.stdout


def test_readme_shows_the_late_delivery_ledger():
    """What the wheel test looks for is what the README shows."""
    first = next(b for b in all_blocks("text") if b.doc == "README.md")
    assert first.text.splitlines() == [LATE_DELIVERY]
