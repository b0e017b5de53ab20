"""Mutation testing of the arithmetic and of the rule application: does a wrong line fail a test?

    python benchmarks/mutation.py --list                    # the mutants, none run
    python benchmarks/mutation.py --jobs 2 --json mutation.json --resume mutation-cache.json
    python benchmarks/mutation.py --module retention/engine.py --functions _decide,_observe
    python benchmarks/mutation.py --limit 10 --profile ci --kinds clamp,constant

What is mutated (``--module`` and ``--functions``; by default both of these):

- ``retention/capital.py``: all of it, every function and method, and the numbers
  its module-level constants hold (``NEGLIGIBLE``, ``_FIRE_STEPS``);
- ``retention/engine.py``: the code that applies the rules (``ENGINE_RULES``
  below): points, repeats and fading traces (``Engine._apply_rule``), settling
  silence, the licence and the clean period into one event (``Engine._apply``),
  recoveries (``Engine._remember``, ``Engine._recover``), recognition
  (``Engine._recognise``), levels firing and re-arming (``Engine._advance``,
  ``Engine._observe``, ``Engine._calm``, ``Engine._fire``, ``Customer.level``), the
  pressure, consent and holdout decisions (``Engine._decide``, ``in_holdout``,
  ``_trim``), and the repeat bounds ``_MAX_MULTIPLIER`` and ``_MAX_POINTS``.

``--functions`` names top-level functions, methods (``Class.method``, or a bare
``method`` for that name in any class) and module-level numeric constants, comma
separated; only the nodes inside those bodies are mutated. Nothing inside an
``assert`` (a check, not behaviour) or an f-string (a message) is mutated, nor
return values (``return x`` -> ``return None`` only crashes the caller).

Each mutant changes one thing (kinds, for ``--kinds``):

- ``comparison``: ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``==`` <-> ``!=``, ``in`` <->
  ``not in``, ``is`` <-> ``is not``;
- ``operator``: ``+`` <-> ``-``, ``*`` <-> ``/``, ``//`` -> ``/``, ``%`` -> ``//``,
  ``**`` -> ``*``, in expressions and in ``+=``-style assignments;
- ``constant``: an integer ``n`` -> ``n + 1``; a float ``0.0`` -> ``1.0``, ``1.0`` ->
  ``2.0``, any other ``x`` -> ``x * 100`` (``1e-6`` -> ``1e-4``);
- ``clamp``: ``clamp(x, lo, hi)`` -> ``x``; ``min(a, b)``/``max(a, b)`` -> ``a``, and
  -> ``b`` (only the other one when one is a constant: ``max(0, x)`` -> ``x``);
  ``a if c else b`` -> ``a``, and -> ``b``;
- ``function``: ``min`` <-> ``max``, ``int`` <-> ``round``, ``math.floor`` <->
  ``math.ceil``, ``math.log2`` <-> ``math.log``;
- ``logic``: ``and`` <-> ``or``, ``not x`` -> ``x``, ``-x`` -> ``x``;
- ``statement``: a statement that changes state removed (a call such as
  ``ledger.append(...)``, an assignment to an attribute or an item, an augmented
  assignment, ``del``, ``continue``, ``break``, an early ``return`` that is all
  of an ``if``'s body).

A mutant whose code compiles to the same bytecode as the original (dead code) is
equivalent by construction: it is counted as ``identical`` and not run.

Every other mutant runs the tests (``--tests``; by default the sharp, fast rule
cases first, then the edge cases, then the hypothesis properties) with ``pytest
-x -q -p no:cacheprovider`` in a copy of the project, one copy per job
(``--jobs``), hypothesis profile ``--profile`` (default ``dev``) and no example
database carried from one mutant to the next. Each copy has a server process that
imports pytest, hypothesis and the libraries the tests use once, then forks a
fresh child per mutant, which imports the project (the mutated module included)
and runs the tests. The mutant is **killed** when the tests fail (or cannot be
collected), **timed out** when they run past ``--timeout`` (default: five times
the unmutated run, at least 60 s: a mutant that loops forever), else it
**survived**. A survivor is either a gap in the tests or an equivalent mutant (one
that changes no behaviour): say which in the issue note.

``--resume FILE`` keeps every result in FILE as it comes, keyed by the mutant
(its module's source, and the rest of the project's code) and by the tests (the
test files, everything else under ``tests/``, the profile, the seed): a rerun
reuses the results of the same mutant under the same tests, and, under other
tests (tests added since), the kills, so only the survivors run again
(``--recheck-kills`` runs those again too). A campaign at the ``dev`` profile,
then a rerun of its survivors at ``--profile ci``, is the cheap way to the CI's
verdict.

Prints each mutant as it is judged, then each survivor with its place, the
mutation and the source line (apart: those benchmarks/equivalents.py explains as
changing no behaviour, with the reason), then the counts, the kill rate (killed and
timed out, of the mutants run, and of those that change behaviour) and the wall
time; ``--json FILE`` writes all of it.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from equivalents import explain  # noqa: E402  (benchmarks/ is no package)

#: The rule-application code of engine.py (see the module docstring).
ENGINE_RULES = (
    "Engine._apply", "Engine._apply_rule", "Engine._remember", "Engine._recover",
    "Engine._recognise", "Engine._advance", "Engine._observe", "Engine._calm",
    "Engine._fire", "Engine._decide", "Customer.level", "in_holdout", "_trim",
    "_MAX_MULTIPLIER", "_MAX_POINTS",
)
#: module -> the names mutated in it by default (None: all of it)
DEFAULT_MODULES: dict[str, tuple[str, ...] | None] = {
    "retention/capital.py": None,
    "retention/engine.py": ENGINE_RULES,
}
#: sharp, fast tests first: with -x the first failure ends the run
DEFAULT_TESTS = ["tests/test_crossings.py", "tests/test_cases.py", "tests/test_edges.py",
                 "tests/test_reference.py", "tests/test_properties.py"]
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider"]
KINDS = ("comparison", "operator", "constant", "clamp", "function", "logic", "statement")
KILLED, TIMED_OUT, SURVIVED, IDENTICAL = "killed", "timed out", "survived", "identical"
#: what the copies leave out of the project
_NOT_COPIED = (".git", ".venv", ".ci", "*.db", "*.db-*", "__pycache__", ".hypothesis",
               "build", "dist", "*.egg-info", ".pytest_cache", ".ruff_cache")


# -- mutations ------------------------------------------------------------------------

_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
            ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
            ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_OPERATOR = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
             ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
_SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==",
           ast.NotEq: "!=", ast.In: "in", ast.NotIn: "not in", ast.Is: "is",
           ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/",
           ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}
_BUILTINS = {"min": "max", "max": "min", "int": "round", "round": "int"}
_MATH = {"floor": "ceil", "ceil": "floor", "log2": "log", "log": "log2"}

#: a way to mutate a node: (kind, what it does, the replacement made from a copy of it)
Option = tuple[str, str, Callable[[ast.AST], ast.AST]]


def _shifted(value: int | float) -> int | float:
    if isinstance(value, int):
        return value + 1
    return value + 1.0 if value in (0.0, 1.0) else float(f"{value * 100:.15g}")


def _text(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 40 else text[:37] + "..."


def _set(node: ast.AST, name: str, value: object) -> ast.AST:
    setattr(node, name, value)
    return node


def _options(node: ast.AST, guard: bool = False) -> list[Option]:
    """The single mutations of ``node`` itself (its children have their own);
    ``guard``: the node is an early return, all of an ``if``'s body."""
    found: list[Option] = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            swap = _COMPARE.get(type(op))
            if swap:
                found.append(("comparison", f"{_SYMBOL[type(op)]} -> {_SYMBOL[swap]}",
                              lambda n, i=i, swap=swap: _set_op(n, i, swap())))
    elif isinstance(node, ast.BinOp | ast.AugAssign):
        swap = _OPERATOR.get(type(node.op))
        if swap:
            eq = "=" if isinstance(node, ast.AugAssign) else ""
            found.append(("operator", f"{_SYMBOL[type(node.op)]}{eq} -> {_SYMBOL[swap]}{eq}",
                          lambda n, swap=swap: _set(n, "op", swap())))
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, int | float) and not isinstance(value, bool):
            shifted = _shifted(value)
            found.append(("constant", f"{value!r} -> {shifted!r}",
                          lambda n, shifted=shifted: _set(n, "value", shifted)))
    elif isinstance(node, ast.Call):
        found.extend(_call_options(node))
    elif isinstance(node, ast.IfExp):
        found.append(("clamp", f"{_text(node)} -> {_text(node.body)}", lambda n: n.body))
        found.append(("clamp", f"{_text(node)} -> {_text(node.orelse)}", lambda n: n.orelse))
    elif isinstance(node, ast.BoolOp):
        was, now, swap = ("and", "or", ast.Or) if isinstance(node.op, ast.And) else (
            "or", "and", ast.And)
        found.append(("logic", f"{was} -> {now}", lambda n, swap=swap: _set(n, "op", swap())))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        sign = "not " if isinstance(node.op, ast.Not) else "-"
        found.append(("logic", f"{sign}{_text(node.operand)} -> {_text(node.operand)}",
                      lambda n: n.operand))
    if isinstance(node, ast.stmt) and (guard or _removable(node)):
        found.append(("statement", f"{_text(node)} -> pass",
                      lambda n: ast.copy_location(ast.Pass(), n)))
    return found


def _set_op(node: ast.Compare, index: int, op: ast.cmpop) -> ast.AST:
    node.ops[index] = op
    return node


def _call_options(node: ast.Call) -> list[Option]:
    func = node.func
    found: list[Option] = []
    if isinstance(func, ast.Name) and func.id == "clamp" and node.args:
        found.append(("clamp", f"clamp({_text(node.args[0])}, ...) -> {_text(node.args[0])}",
                      lambda n: n.args[0]))
    if (isinstance(func, ast.Name) and func.id in ("min", "max") and len(node.args) == 2
            and not node.keywords):
        constants = [isinstance(a, ast.Constant) for a in node.args]
        for i, arg in enumerate(node.args):
            if not constants[i] or all(constants):
                found.append(("clamp", f"{func.id}({_text(node.args[0])}, "
                                       f"{_text(node.args[1])}) -> {_text(arg)}",
                              lambda n, i=i: n.args[i]))
    if isinstance(func, ast.Name) and func.id in _BUILTINS:
        other = _BUILTINS[func.id]
        found.append(("function", f"{func.id} -> {other}",
                      lambda n, other=other: _renamed(n, "id", other)))
    if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and func.value.id == "math" and func.attr in _MATH):
        other = _MATH[func.attr]
        found.append(("function", f"math.{func.attr} -> math.{other}",
                      lambda n, other=other: _renamed(n, "attr", other)))
    return found


def _renamed(call: ast.Call, name: str, value: str) -> ast.AST:
    setattr(call.func, name, value)
    return call


def _removable(node: ast.stmt) -> bool:
    """Whether removing the statement is a sensible mutant: it changes state or flow."""
    if isinstance(node, ast.Expr):
        return isinstance(node.value, ast.Call)
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Attribute | ast.Subscript) for t in node.targets)
    return isinstance(node, ast.AugAssign | ast.Delete | ast.Continue | ast.Break)


# -- where: the selected bodies -------------------------------------------------------

@dataclass(frozen=True)
class Scope:
    """A named body that is mutated: a function, a method, or a module constant."""

    name: str
    #: the statement that holds it (a def, or a constant's assignment): what a mutant
    #: of it rewrites
    holder: ast.stmt
    #: the nodes under which everything may be mutated (a def's body and defaults)
    roots: tuple[ast.AST, ...]


def _body(node: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[ast.AST, ...]:
    defaults = [d for d in (*node.args.defaults, *node.args.kw_defaults) if d]
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(
            body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    return (*defaults, *body)


def _named(tree: ast.Module) -> list[Scope]:
    """The mutable bodies of a module, in source order: functions, methods (named
    ``Class.method``), numeric constants."""
    found: list[Scope] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found.append(Scope(node.name, node, _body(node)))
        elif isinstance(node, ast.ClassDef):
            found.extend(Scope(f"{node.name}.{member.name}", member, _body(member))
                         for member in node.body
                         if isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef))
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            if (len(targets) == 1 and isinstance(targets[0], ast.Name)
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, int | float)
                    and not isinstance(value.value, bool)):
                found.append(Scope(targets[0].id, node, (value,)))
    return found


def scopes(tree: ast.Module, names: tuple[str, ...] | None) -> list[Scope]:
    """The scopes ``names`` select in ``tree`` (None: all of them), in source order: a
    name is a function, ``Class.method``, a bare method name (in any class) or a
    numeric constant. Raises ValueError for a name the module does not have."""
    named = _named(tree)
    if names is None:
        return named
    chosen: set[str] = set()
    for wanted in names:
        matches = {s.name for s in named if wanted in (s.name, s.name.rsplit(".", 1)[-1])}
        if not matches:
            raise ValueError(f"no function, method or numeric constant named {wanted!r}")
        chosen |= matches
    return [s for s in named if s.name in chosen]


#: where a node sits: (parent, field, index in the field's list or None)
Slot = tuple[ast.AST, str, int | None]


def _sites(scope: Scope) -> Iterator[tuple[ast.AST, Slot, bool]]:
    """Every node under the scope's roots, in source order, with its slot and whether
    it is a guard (an early return, all of an ``if``'s body); nothing inside an
    assert or an f-string, nor a nested def's annotations and defaults."""

    def walk(node: ast.AST, slot: Slot, guard: bool) -> Iterator[tuple[ast.AST, Slot, bool]]:
        if isinstance(node, ast.Assert | ast.JoinedStr):
            return
        yield node, slot, guard
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "decorator_list", "type_comment") or (
                    name == "args" and isinstance(node, ast.FunctionDef
                                                  | ast.AsyncFunctionDef | ast.Lambda)):
                continue
            items = value if isinstance(value, list) else [value]
            for i, child in enumerate(items):
                if isinstance(child, ast.AST):
                    is_guard = (isinstance(node, ast.If) and name == "body"
                                and len(items) == 1 and isinstance(child, ast.Return))
                    yield from walk(child, (node, name, i if isinstance(value, list)
                                            else None), is_guard)

    holder = scope.holder
    for root in scope.roots:
        slot = _slot_in(holder, root)
        yield from walk(root, slot, False)


def _slot_in(holder: ast.AST, root: ast.AST) -> Slot:
    for parent in ast.walk(holder):
        for name, value in ast.iter_fields(parent):
            if value is root:
                return parent, name, None
            if isinstance(value, list) and any(item is root for item in value):
                return parent, name, next(i for i, item in enumerate(value) if item is root)
    raise LookupError("root not under its holder")


def _put(slot: Slot, node: ast.AST) -> None:
    parent, name, index = slot
    if index is None:
        setattr(parent, name, node)
    else:
        getattr(parent, name)[index] = node


# -- mutants --------------------------------------------------------------------------

@dataclass
class Mutant:
    module: str
    function: str
    line: int
    kind: str
    what: str
    code: str  # the source line mutated
    source: str = field(repr=False)  # the whole mutated module
    identical: bool = False  # compiles to the original's bytecode

    @property
    def key(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    @property
    def place(self) -> str:
        return f"{self.module}:{self.line}"


def _same_code(a: object, b: object) -> bool:
    """Whether two code objects do the same (line numbers aside)."""
    if not (hasattr(a, "co_code") and hasattr(b, "co_code")):
        return type(a) is type(b) and repr(a) == repr(b)  # (repr: -0.0 is not 0.0)
    fields = ("co_code", "co_names", "co_varnames", "co_freevars", "co_cellvars",
              "co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_flags")
    if any(getattr(a, f) != getattr(b, f) for f in fields):
        return False
    consts_a, consts_b = a.co_consts, b.co_consts  # type: ignore[attr-defined]
    return len(consts_a) == len(consts_b) and all(
        _same_code(x, y) for x, y in zip(consts_a, consts_b, strict=True))


def _compiled(holder: ast.stmt) -> tuple[str, object]:
    """A holder's source as ast.unparse writes it, and its bytecode compiled alone."""
    text = ast.unparse(holder)
    return text, compile(text, "<mutant>", "exec")


def mutants(source: str, module: str = "module.py", names: tuple[str, ...] | None = None,
            kinds: tuple[str, ...] = KINDS) -> list[Mutant]:
    """Every single-change mutant of ``source`` inside the scopes ``names`` selects
    (None: all), of the given kinds, in source order.

    A mutant rewrites only the definition it changes (as ``ast.unparse`` writes it,
    comments gone); the rest of the module keeps its text and line numbers."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    found = []
    for scope in scopes(tree, names):
        holder = scope.holder
        first = min([holder.lineno, *(d.lineno for d in getattr(holder, "decorator_list", []))])
        last = holder.end_lineno or holder.lineno
        indent = " " * holder.col_offset
        _, original = _compiled(holder)
        for node, slot, guard in list(_sites(scope)):
            for kind, what, make in _options(node, guard):
                if kind not in kinds:
                    continue
                _put(slot, make(copy.deepcopy(node)))
                try:
                    text, code = _compiled(holder)
                finally:
                    _put(slot, node)
                body = "".join(indent + line if line.strip() else line
                               for line in text.splitlines(keepends=True))
                line = getattr(node, "lineno", holder.lineno)
                found.append(Mutant(
                    module=module, function=scope.name, line=line, kind=kind, what=what,
                    code=lines[line - 1].strip(),
                    source="".join([*lines[:first - 1], body.rstrip("\n") + "\n",
                                    *lines[last:]]),
                    identical=_same_code(code, original)))
    return found


# -- the cache ------------------------------------------------------------------------

def _digest(paths: list[Path], base: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for path in sorted(paths):
        h.update(str(path.relative_to(base)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _files(base: Path, folder: str) -> list[Path]:
    return [p for p in (base / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]


def code_hash(base: Path, module: str) -> str:
    """The project's code and data other than the mutated module."""
    paths = [p for p in _files(base, "retention") if p != base / module]
    paths += [*_files(base, "examples"), base / "pyproject.toml"]
    return _digest(paths, base)


def suite_hash(base: Path, tests: list[str], settings: str) -> str:
    """The tests: the test files run and all else under tests/ (helpers, cases)."""
    chosen = [base / t for t in tests if (base / t).is_file()]
    helpers = [p for p in _files(base, "tests")
               if not (p.name.startswith("test_") and p.suffix == ".py")]
    return _digest(chosen + helpers, base, extra=" ".join(tests) + "\n" + settings)


def reusable(entry: dict | None, suite: str, *, recheck_kills: bool) -> bool:
    """Whether a cached result stands: the same tests, or a kill under others."""
    if entry is None:
        return False
    if entry["suite"] == suite:
        return True
    return entry["outcome"] in (KILLED, TIMED_OUT) and not recheck_kills


class Cache:
    """Results by mutant key, in a JSON file written after each result."""

    def __init__(self, path: Path | None):
        self.path = path
        self.lock = threading.Lock()
        self.results: dict[str, dict] = {}
        if path is not None and path.exists():
            try:
                self.results = json.loads(path.read_text(encoding="utf-8"))["results"]
            except (ValueError, KeyError, TypeError) as exc:
                sys.exit(f"{path}: not a mutation results file ({exc})")

    def put(self, key: str, entry: dict) -> None:
        if self.path is None:
            return
        with self.lock:
            self.results[key] = entry
            scratch = self.path.with_name(self.path.name + ".tmp")
            scratch.write_text(json.dumps({"results": self.results}, indent=0),
                               encoding="utf-8")
            scratch.replace(self.path)


# -- running the tests: one server per copy -------------------------------------------

def serve(root: Path) -> None:
    """The server of one copy: imports what the tests need once, then for each request
    (a JSON line: pytest arguments and a timeout) forks a child that runs pytest in
    the copy, and answers with a JSON line: exit code, timed out, seconds, the first
    failing test."""
    os.chdir(root)
    sys.path.insert(0, str(root))
    for name in _warm_modules(root):
        with contextlib.suppress(Exception):  # one that imports only in its context
            __import__(name)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(_run_child(root, request["args"], request["timeout"])), flush=True)


def _warm_modules(root: Path) -> list[str]:
    """The modules, not the project's, that collecting the tests imports (found in a
    child, so that this process imports none of the project)."""
    report = root / ".mutation-modules.json"
    code, _, _ = _fork(root, lambda: _collect(root, report), timeout=300)
    if code != 0 or not report.exists():
        return []
    return json.loads(report.read_text(encoding="utf-8"))


def _collect(root: Path, report: Path) -> int:
    import pytest
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider",
                        *json.loads(os.environ["MUTATION_TESTS"])])
    names = []
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None) or ""
        ours = where.startswith(str(root)) or (
            where.startswith(str(ROOT)) and not where.startswith(sys.prefix))
        if name != "__main__" and where and not ours and name.split(".")[0] not in (
                "retention", "tests", "conftest"):
            names.append(name)
    report.write_text(json.dumps(sorted(names)), encoding="utf-8")
    return int(code)


class _FirstFailure:
    """A pytest plugin that notes the first failing test (or collection)."""

    def __init__(self) -> None:
        self.nodeid = ""

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and not self.nodeid:
            self.nodeid = report.nodeid

    def pytest_collectreport(self, report) -> None:
        if report.failed and not self.nodeid:
            self.nodeid = f"collecting {report.nodeid}"


def _pytest_run(root: Path, args: list[str], note: Path) -> int:
    import importlib.util

    import pytest
    spec = importlib.util.find_spec("retention")
    if spec is None or not str(spec.origin).startswith(str(root)):
        return 97  # the project would be imported from elsewhere: nothing measured
    shutil.rmtree(root / ".hypothesis", ignore_errors=True)  # no examples carried over
    first = _FirstFailure()
    code = pytest.main(args, plugins=[first])
    note.write_text(first.nodeid, encoding="utf-8")
    return int(code)


def _run_child(root: Path, args: list[str], timeout: float) -> dict:
    note = root / ".mutation-failure"
    note.unlink(missing_ok=True)
    code, timed_out, seconds = _fork(root, lambda: _pytest_run(root, args, note), timeout)
    failed = note.read_text(encoding="utf-8") if note.exists() else ""
    return {"code": code, "timed_out": timed_out, "seconds": seconds, "failed": failed}


def _fork(root: Path, work: Callable[[], int], timeout: float
          ) -> tuple[int, bool, float]:
    """Run ``work`` in a forked child, in its own process group, output to a log;
    kill the group past ``timeout``. Returns (exit code, timed out, seconds)."""
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child
        code = 3
        try:
            os.setpgid(0, 0)
            log = os.open(root / ".mutation-log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            random.seed()  # not the server's state: each run draws its own examples
            code = work()
        finally:
            os._exit(code)
    with contextlib.suppress(OSError):  # (the child does it too: whichever comes first)
        os.setpgid(pid, pid)
    deadline = started + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                return code, False, time.perf_counter() - started
            if time.perf_counter() > deadline:
                _kill_group(pid)
                return -9, True, time.perf_counter() - started
            time.sleep(0.01)
    except BaseException:  # interrupted: the child must not run on alone
        _kill_group(pid)
        raise


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


class Worker:
    """One copy of the project and its server."""

    def __init__(self, folder: Path, tests: list[str], modules: list[str], profile: str):
        self.root = folder / "project"
        shutil.copytree(ROOT, self.root, ignore=shutil.ignore_patterns(*_NOT_COPIED))
        self.modules = modules
        self.originals = {m: (self.root / m).read_text(encoding="utf-8") for m in modules}
        env = {**os.environ, "MUTATION_TESTS": json.dumps(tests),
               "PYTHONPATH": str(self.root), "HYPOTHESIS_PROFILE": profile}
        self.server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", str(self.root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=self.root,
            text=True)

    def run(self, args: list[str], timeout: float, mutant: Mutant | None = None) -> dict:
        """The tests of the copy with ``mutant`` in place (None: unmutated)."""
        for module in self.modules:
            wanted = mutant.source if mutant and mutant.module == module else \
                self.originals[module]
            path = self.root / module
            if path.read_text(encoding="utf-8") != wanted:
                path.write_text(wanted, encoding="utf-8")
            # a stale .pyc of the same size and second would be loaded instead
            for stale in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
                stale.unlink()
        assert self.server.stdin is not None and self.server.stdout is not None
        args = [*args, f"--basetemp={self.root / '.mutation-tmp'}"]
        self.server.stdin.write(json.dumps({"args": args, "timeout": timeout}) + "\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        if not answer:
            raise RuntimeError("the test server of a copy stopped")
        return json.loads(answer)

    def close(self) -> None:
        try:
            if self.server.stdin:
                self.server.stdin.close()
            self.server.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.server.kill()  # (its child is killed with it: see _fork)
            self.server.wait()


# -- the campaign ---------------------------------------------------------------------

def _outcome(answer: dict) -> str:
    if answer["timed_out"]:
        return TIMED_OUT
    return SURVIVED if answer["code"] == 0 else KILLED


def _select(args: argparse.Namespace) -> list[tuple[str, tuple[str, ...] | None]]:
    if args.functions is not None and len(args.module or []) != 1:
        sys.exit("--functions needs exactly one --module")
    if not args.module:
        return list(DEFAULT_MODULES.items())
    if args.functions is not None:
        names = tuple(n.strip() for n in args.functions.split(",") if n.strip())
        return [(args.module[0], names or None)]
    return [(m, DEFAULT_MODULES.get(m)) for m in args.module]


def _all_mutants(selection: list[tuple[str, tuple[str, ...] | None]],
                 kinds: tuple[str, ...]) -> list[Mutant]:
    found = []
    for module, names in selection:
        path = ROOT / module
        if not path.is_file():
            sys.exit(f"{module}: no such module")
        try:
            found += mutants(path.read_text(encoding="utf-8"), module, names, kinds)
        except ValueError as exc:
            sys.exit(f"{module}: {exc}")
    return found


def _describe(m: Mutant) -> str:
    return f"{m.place} ({m.function}) {m.kind}: {m.what}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="See the module docstring for what is mutated and how results are kept.")
    parser.add_argument("--module", action="append",
                        help="module to mutate (repeatable; default: "
                             + ", ".join(DEFAULT_MODULES) + ")")
    parser.add_argument("--functions", help="comma-separated functions, Class.methods and "
                        "constants of the one --module to mutate (default for engine.py: "
                        "ENGINE_RULES; for another module: all)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"kinds of mutation (default: {','.join(KINDS)})")
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS,
                        help="test files, in the order they run (default: %(default)s)")
    parser.add_argument("--profile", default="dev", help="hypothesis profile of the runs")
    parser.add_argument("--seed", type=int, help="hypothesis seed (default: random)")
    parser.add_argument("--limit", type=int, help="run the first N mutants only")
    parser.add_argument("--timeout", type=float,
                        help="seconds per mutant (default: 5 x the unmutated run, >= 60)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--list", action="store_true", help="print the mutants, run none")
    parser.add_argument("--resume", type=Path, metavar="FILE",
                        help="JSON file of results, read and kept up to date")
    parser.add_argument("--recheck-kills", action="store_true",
                        help="with --resume: run again the kills made under other tests")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write all results here")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        sys.exit(f"unknown kind {unknown[0]!r}: choose among {', '.join(KINDS)}")
    if args.jobs < 1:
        sys.exit("--jobs must be at least 1")
    missing = [t for t in args.tests if not (ROOT / t.split("::")[0]).exists()]
    if missing:
        sys.exit(f"{missing[0]}: no such test file")
    started = time.perf_counter()
    selection = _select(args)
    found = _all_mutants(selection, kinds)
    identical = [m for m in found if m.identical]
    runnable = [m for m in found if not m.identical][:args.limit]
    if args.list:
        for m in found:
            print(f"{_describe(m)}{'  [identical bytecode]' if m.identical else ''}"
                  f"\n    {m.code}")
        by_kind = {k: sum(m.kind == k for m in found) for k in kinds}
        print(f"{len(found)} mutants ({', '.join(f'{k} {n}' for k, n in by_kind.items())}), "
              f"{len(identical)} of them identical in bytecode")
        return

    settings = f"profile={args.profile} seed={args.seed} args={' '.join(PYTEST_ARGS)}"
    suite = suite_hash(ROOT, args.tests, settings)
    codes = {module: code_hash(ROOT, module) for module, _ in selection}
    cache = Cache(args.resume)
    key = {id(m): hashlib.sha256((m.key + codes[m.module]).encode()).hexdigest()
           for m in runnable}
    results: dict[int, dict] = {}
    for m in runnable:
        entry = cache.results.get(key[id(m)])
        if reusable(entry, suite, recheck_kills=args.recheck_kills):
            assert entry is not None
            results[id(m)] = {**entry, "cached": True}
    todo = [m for m in runnable if id(m) not in results]
    print(f"{len(found)} mutants of {', '.join(m for m, _ in selection)} "
          f"({len(identical)} identical in bytecode, not run); running {len(todo)}"
          f"{f', {len(runnable) - len(todo)} known from {args.resume}' if args.resume else ''}"
          f"; tests: {' '.join(args.tests)} (hypothesis profile {args.profile}, "
          f"{args.jobs} job(s))", flush=True)

    pytest_args = [*PYTEST_ARGS, *(["--hypothesis-seed", str(args.seed)]
                                    if args.seed is not None else []), *args.tests]
    modules = [module for module, _ in selection]
    if todo:
        with tempfile.TemporaryDirectory(prefix="mutation-") as folder:
            workers = []
            try:
                for j in range(min(args.jobs, len(todo))):
                    (Path(folder) / str(j)).mkdir()
                    workers.append(Worker(Path(folder) / str(j), args.tests, modules,
                                          args.profile))
                timeout = _baseline(workers, pytest_args, args.timeout)
                _campaign(todo, workers, pytest_args, timeout, results, cache, key, suite)
            finally:
                for w in workers:
                    w.close()
    _report(found, identical, runnable, results, time.perf_counter() - started, args)


def _baseline(workers: list[Worker], pytest_args: list[str], timeout: float | None) -> float:
    """Run the unmutated tests in every copy; the timeout per mutant."""
    with concurrent.futures.ThreadPoolExecutor(len(workers)) as pool:
        answers = list(pool.map(lambda w: w.run(pytest_args, 3600.0), workers))
    for answer in answers:
        if answer["code"] == 97:
            sys.exit("the copy's tests would import retention from elsewhere")
        if answer["code"] != 0:
            sys.exit("the tests fail on the unmutated code: nothing to measure"
                     f" (first failure: {answer['failed'] or 'see pytest'})")
    slowest = max(a["seconds"] for a in answers)
    chosen = timeout if timeout is not None else max(60.0, 5 * slowest)
    print(f"unmutated run: passed in {slowest:.1f} s; timeout per mutant {chosen:.0f} s"
          + (" (shorter than the unmutated run: a survivor will time out)"
             if chosen < slowest else ""), flush=True)
    return chosen


def _campaign(todo: list[Mutant], workers: list[Worker], pytest_args: list[str],
              timeout: float, results: dict[int, dict], cache: Cache, key: dict[int, str],
              suite: str) -> None:
    free = list(workers)
    lock = threading.Lock()
    counter = iter(range(1, len(todo) + 1))

    def judge(m: Mutant) -> None:
        with lock:
            worker = free.pop()
        try:
            answer = worker.run(pytest_args, timeout, m)
        finally:
            with lock:
                free.append(worker)
        if answer["code"] == 97:
            raise RuntimeError("the copy's tests would import retention from elsewhere")
        entry = {"suite": suite, "outcome": _outcome(answer),
                 "seconds": round(answer["seconds"], 2), "killer": answer["failed"],
                 "module": m.module, "line": m.line, "what": m.what}
        results[id(m)] = {**entry, "cached": False}
        cache.put(key[id(m)], entry)
        with lock:
            n = next(counter)
            verdict = entry["outcome"] if entry["outcome"] != SURVIVED else "SURVIVED"
            killer = f", {entry['killer']}" if entry["killer"] else ""
            print(f"[{n}/{len(todo)}] {_describe(m)}: {verdict} "
                  f"({entry['seconds']:.1f} s{killer})", flush=True)

    pool = concurrent.futures.ThreadPoolExecutor(len(workers))
    try:
        for future in [pool.submit(judge, m) for m in todo]:
            future.result()
    finally:  # on a failure or ^C, the mutants not started are not run
        pool.shutdown(wait=True, cancel_futures=True)


def _report(found: list[Mutant], identical: list[Mutant], runnable: list[Mutant],
            results: dict[int, dict], wall: float, args: argparse.Namespace) -> None:
    outcomes = [results[id(m)]["outcome"] for m in runnable]
    killed, timed = outcomes.count(KILLED), outcomes.count(TIMED_OUT)
    survivors = [m for m in runnable if results[id(m)]["outcome"] == SURVIVED]
    why = {id(m): explain(m.module, m.function, m.code, m.what) for m in survivors}
    unexplained = [m for m in survivors if why[id(m)] is None]
    print(f"\nsurvivors that change no behaviour ({len(survivors) - len(unexplained)}; "
          "benchmarks/equivalents.py says why):")
    for m in survivors:
        if why[id(m)] is not None:
            print(f"  {_describe(m)}\n      {m.code}\n      ({why[id(m)]})")
    print(f"\nsurvivors to kill ({len(unexplained)}):")
    for m in unexplained:
        print(f"  {_describe(m)}\n      {m.code}")
    rate = (killed + timed) / len(runnable) if runnable else 1.0
    behaving = len(runnable) - (len(survivors) - len(unexplained))
    real_rate = (killed + timed) / behaving if behaving else 1.0
    cached = sum(results[id(m)]["cached"] for m in runnable)
    print(f"\nmutants: {len(found)}; run: {len(runnable)} ({cached} known from before); "
          f"killed: {killed}; timed out: {timed}; survived: {len(survivors)} "
          f"({len(survivors) - len(unexplained)} equivalent); "
          f"skipped (identical bytecode): {len(identical)}")
    print(f"kill rate: {rate:.1%} ({killed + timed} of {len(runnable)}); of the mutants that "
          f"change behaviour: {real_rate:.1%} ({killed + timed} of {behaving}); "
          f"wall time: {wall:.0f} s")
    if args.json:
        rows = []
        for m in found:
            row = {k: v for k, v in asdict(m).items() if k not in ("source", "identical")}
            row["outcome"] = IDENTICAL if m.identical else (
                results[id(m)]["outcome"] if id(m) in results else "not run")
            if id(m) in results:
                row.update({k: results[id(m)][k] for k in ("seconds", "killer", "cached")})
            if id(m) in why and why[id(m)] is not None:
                row["equivalent"] = why[id(m)]
            rows.append(row)
        summary = {"mutants": len(found), "run": len(runnable), "killed": killed,
                   "timed_out": timed, "survived": len(survivors),
                   "identical": len(identical), "kill_rate": rate,
                   "equivalent": len(survivors) - len(unexplained),
                   "kill_rate_of_behaving": real_rate,
                   "wall_seconds": round(wall, 1), "tests": args.tests,
                   "profile": args.profile, "seed": args.seed, "jobs": args.jobs}
        args.json.write_text(json.dumps({"summary": summary, "mutants": rows}, indent=1),
                             encoding="utf-8")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
