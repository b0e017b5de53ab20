"""Mutation testing of the capital arithmetic: does a wrong line fail a test?

    python benchmarks/mutation.py                       # every mutant of capital.py
    python benchmarks/mutation.py --limit 10 --profile ci
    python benchmarks/mutation.py --module retention/engine.py --tests tests/test_cases.py

Each mutant changes one thing in one line of the module (a comparison flipped or
made strict, ``+`` for ``-``, ``*`` for ``/``, ``//`` for ``/``, a number shifted, a
``clamp(x, ...)`` replaced by ``x``, ``log2`` for ``log``, ``min`` for ``max``), in a
copy of the project; the tests then run against the copy (hypothesis profile
``--profile``, default ``dev``). A mutant is killed when the tests fail. Prints each
surviving mutant with its line, then the kill rate. A survivor is either a gap in
the tests or an equivalent mutant (one that changes no behaviour): say which in
the issue note.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = ["tests/test_cases.py", "tests/test_properties.py", "tests/test_edges.py"]

_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
            ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
_BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
           ast.FloorDiv: ast.Div}
_NAMES = {"log2": "log", "log": "log2", "min": "max", "max": "min", "int": "round"}


class _Mutator(ast.NodeTransformer):
    """Counts the places a mutation applies; changes the ``target``-th of them."""

    def __init__(self, target: int = -1):
        self.target = target
        self.seen = 0
        self.done: tuple[int, str] | None = None

    def _site(self, node: ast.AST, what: str) -> bool:
        hit = self.seen == self.target
        self.seen += 1
        if hit:
            self.done = (getattr(node, "lineno", 0), what)
        return hit

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            swap = _COMPARE.get(type(op))
            if swap and self._site(node, f"{type(op).__name__} -> {swap.__name__}"):
                node.ops[i] = swap()
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        swap = _BINARY.get(type(node.op))
        if swap and self._site(node, f"{type(node.op).__name__} -> {swap.__name__}"):
            node.op = swap()
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        if isinstance(value, int | float) and not isinstance(value, bool):
            shifted = value * 100 if value not in (0, 1) else value + 1
            if self._site(node, f"{value!r} -> {shifted!r}"):
                return ast.copy_location(ast.Constant(shifted), node)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else \
            func.id if isinstance(func, ast.Name) else None
        if name == "clamp" and node.args and self._site(node, "clamp(x, ...) -> x"):
            return node.args[0]
        if name in _NAMES and self._site(node, f"{name} -> {_NAMES[name]}"):
            if isinstance(func, ast.Attribute):
                func.attr = _NAMES[name]
            else:
                func.id = _NAMES[name]
        return node


def _functions_only(tree: ast.Module) -> list[ast.AST]:
    """The bodies worth mutating: functions and methods (not imports, constants of
    types, docstrings)."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]


def mutants(source: str) -> list[tuple[int, str, str]]:
    """Every single-change mutant of ``source``: (line, what, mutated source)."""
    tree = ast.parse(source)
    counter = _Mutator()
    for fn in _functions_only(tree):
        counter.visit(copy.deepcopy(fn))
    found = []
    for target in range(counter.seen):
        mutated = copy.deepcopy(tree)
        mutator = _Mutator(target)
        for fn in _functions_only(mutated):
            mutator.visit(fn)
        if mutator.done is None:
            continue
        line, what = mutator.done
        found.append((line, what, ast.unparse(ast.fix_missing_locations(mutated))))
    return found


def run_tests(copy_root: Path, tests: list[str], profile: str, timeout: float) -> bool:
    """Whether the tests pass in ``copy_root`` (a timeout counts as a failure)."""
    env = {**os.environ, "HYPOTHESIS_PROFILE": profile, "PYTHONPATH": str(copy_root)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=copy_root, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default="retention/capital.py")
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS)
    parser.add_argument("--profile", default="dev", help="hypothesis profile of the runs")
    parser.add_argument("--limit", type=int, help="try the first N mutants only")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant")
    args = parser.parse_args()

    source = (ROOT / args.module).read_text(encoding="utf-8")
    found = mutants(source)[:args.limit]
    print(f"{len(found)} mutants of {args.module}; tests: {' '.join(args.tests)} "
          f"(hypothesis profile {args.profile})")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "project"
        shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".ci", "*.db", "__pycache__", ".hypothesis", "build"))
        target = root / args.module
        started = time.perf_counter()
        if not run_tests(root, args.tests, args.profile, args.timeout):
            sys.exit("the tests fail on the unmutated code: nothing to measure")
        print(f"unmutated run: passed in {time.perf_counter() - started:.0f} s")
        survivors = []
        for n, (line, what, mutated) in enumerate(found, 1):
            target.write_text(mutated, encoding="utf-8")
            killed = not run_tests(root, args.tests, args.profile, args.timeout)
            print(f"[{n}/{len(found)}] line {line}: {what}: "
                  f"{'killed' if killed else 'SURVIVED'}", flush=True)
            if not killed:
                survivors.append((line, what))
        target.write_text(source, encoding="utf-8")
    killed = len(found) - len(survivors)
    print(f"\nkilled {killed} of {len(found)} ({killed / max(1, len(found)):.0%}); "
          f"survivors: {len(survivors)}")
    for line, what in survivors:
        print(f"  {args.module}:{line}: {what}")


if __name__ == "__main__":
    main()
