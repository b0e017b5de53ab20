"""The condition language of rule files: a small, safe subset of Python expressions.

A condition is parsed with :mod:`ast`, checked against a whitelist, and turned into
one plain Python function, once, at load time. Nothing else is allowed: no
attribute access beyond ``event.FIELD`` and ``customer.FIELD``, no name starting
with an underscore, no call but a registered function, no import, no eval.

Missing fields: a field the event lacks reads as :data:`MISSING`. Any comparison
involving it (``==``, ``!=``, ``<``, ``in``, ``not in``...) is false, arithmetic on
it stays missing, and it is falsy. A comparison that cannot be made (``"a" < 1``)
is false as well, and an arithmetic error (division by zero, a whole number past
64 bits) gives missing: a condition never raises at run time. Every operation does
work bounded by the size of its operands (no ``**``, no text repetition), and a
condition is at most MAX_LENGTH characters, so no event can make one run long.

Two evaluators share these semantics: the compiled function (fast) and a small
tree interpreter (the reference). The compiled function falls back to the
interpreter whenever Python raises, and the tests check that both agree.
"""

from __future__ import annotations

import ast
import difflib
import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs

#: The fields of ``customer.*`` a condition can read (as they were before the event).
CUSTOMER_FIELDS = ("capital", "level", "purchases", "spent", "days_since_contact", "consent")

#: Longer conditions are refused (they belong in several rules).
MAX_LENGTH = 2000

#: The fields every event has, read as attributes of the event.
EVENT_CORE = ("id", "customer", "type", "at", "source")


class _Missing:
    """The value of a field an event does not have."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False

    def __hash__(self) -> int:
        return 0x5EED

    def _false(self, other: object) -> bool:
        return False

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _false  # type: ignore[assignment]

    def __contains__(self, item: object) -> bool:
        return False

    def _missing(self, *other: object) -> _Missing:
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _missing
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = _missing
    __mod__ = __rmod__ = __neg__ = __pos__ = _missing


MISSING = _Missing()


#: Functions a condition may call: the plugins' (``register_functions`` hook; the
#: built-in ones are in retention/plugins/functions.py) and ``register_function``'s.
FUNCTIONS: dict[str, Callable[..., Any]] = {}


def register_function(name: str, function: Callable[..., Any]) -> None:
    """Make ``function`` callable from rule-file conditions as ``name(...)``."""
    if not name.isidentifier() or name.startswith("_"):
        raise ValueError(f"{name!r} is not a valid condition function name")
    FUNCTIONS[name] = function


class ExpressionError(ValueError):
    """A condition that is not allowed; ``line``/``column`` are 1-based in its text."""

    def __init__(self, message: str, line: int = 1, column: int = 1):
        super().__init__(message)
        self.line = line
        self.column = column


_NUMBERS = (int, float)

#: Whole numbers in arithmetic stay within 64 bits (SQLite's integers): a product
#: of event fields of thousands of digits each would take seconds per event.
INT_LIMIT = 2**63


def _numeric(op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Arithmetic on numbers only: ``"ab" * 10**9`` must not build a string, and a
    whole number past INT_LIMIT (an operand or the result) gives missing."""
    def apply(left: Any, right: Any) -> Any:
        if type(left) in _NUMBERS and type(right) in _NUMBERS:
            if (type(left) is int and not -INT_LIMIT < left < INT_LIMIT) or (
                    type(right) is int and not -INT_LIMIT < right < INT_LIMIT):
                return MISSING
            result = op(left, right)
            if type(result) is int and not -INT_LIMIT < result < INT_LIMIT:
                return MISSING
            return result
        return MISSING
    return apply


_LITERAL_NAMES = {"true": True, "false": False, "True": True, "False": False,
                  "none": None, "null": None, "None": None}
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    kind: _numeric(op) for kind, op in (
        (ast.Add, operator.add), (ast.Sub, operator.sub), (ast.Mult, operator.mul),
        (ast.Div, operator.truediv), (ast.FloorDiv, operator.floordiv),
        (ast.Mod, operator.mod))
}
_UNARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.USub: _numeric(lambda value, _: -value), ast.UAdd: _numeric(lambda value, _: +value),
}


def _in(item: Any, container: Any) -> bool:
    if item is MISSING or container is MISSING:
        return False
    return item in container


def _not_in(item: Any, container: Any) -> bool:
    if item is MISSING or container is MISSING:
        return False
    return item not in container


_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: _in, ast.NotIn: _not_in,
}


def suggest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fail(node: ast.AST, message: str) -> ExpressionError:
    return ExpressionError(message, getattr(node, "lineno", 1), getattr(node, "col_offset", 0) + 1)


@attrs.frozen(kw_only=True)
class Condition:
    """A compiled condition. Call it with ``(event, props, customer)``; it returns a bool.

    ``event_types`` is the set of event types it can match (None: any type), used
    to index rules by type; ``customer_fields`` the ``customer.*`` fields it reads,
    ``event_fields`` the event properties (``event.FIELD`` beyond id, customer, type,
    at and source).
    """

    source: str
    function: Callable[[Any, Any, Any], bool] = attrs.field(repr=False)
    tree: ast.expr = attrs.field(repr=False)
    functions: dict[str, Callable[..., Any]] = attrs.field(repr=False)
    event_types: frozenset[str] | None
    customer_fields: frozenset[str]
    event_fields: frozenset[str] = frozenset()

    def __call__(self, event: Any, props: Any, customer: Any) -> bool:
        return self.function(event, props, customer)

    def reference(self, event: Any, props: Any, customer: Any) -> bool:
        """The interpreted evaluation, the definition the compiled one must agree with."""
        return bool(_interpret(self.tree, event, props, customer, self.functions))


def compile_condition(source: str) -> Condition:
    """Check ``source`` against the whitelist and compile it; raises ExpressionError."""
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("a condition must be a non-empty expression")
    if len(source) > MAX_LENGTH:
        raise ExpressionError(f"a condition is limited to {MAX_LENGTH:,} characters")
    try:
        tree = ast.parse(source.strip(), mode="eval")
        customer_fields: set[str] = set()
        event_fields: set[str] = set()
        checked = _Checker(customer_fields, event_fields).visit(tree.body)
        functions = dict(FUNCTIONS)  # a snapshot: both evaluators call the same functions
        function = _build(checked, source, functions)
    except SyntaxError as exc:
        slip = _slip(source.strip())
        if slip is not None:
            raise slip from None
        raise ExpressionError(
            f"invalid condition: {exc.msg}", exc.lineno or 1, exc.offset or 1
        ) from None
    except ExpressionError:
        raise
    except (RecursionError, MemoryError, ValueError, OverflowError):
        raise ExpressionError("condition too complex: nested too deeply") from None
    return Condition(
        source=source,
        function=function,
        functions=functions,
        tree=checked,
        event_types=_event_types(checked),
        customer_fields=frozenset(customer_fields),
        event_fields=frozenset(event_fields),
    )


#: The usual slips of other languages, and what the condition language writes
#: instead; looked for (outside quoted text) only in a condition that does not parse.
_SLIPS = (
    (re.compile(r"=>"), "'=>' is not an operator (did you mean '>='?)"),
    (re.compile(r"=<"), "'=<' is not an operator (did you mean '<='?)"),
    (re.compile(r"&&"), "'&&' is not an operator (did you mean 'and'?)"),
    (re.compile(r"\|\|"), "'||' is not an operator (did you mean 'or'?)"),
    (re.compile(r"!(?!=)"), "'!' is not an operator (did you mean 'not'?)"),
    (re.compile(r"(?<![=!<>])=(?!=)"), "'=' is not a comparison (did you mean '=='?)"),
    (re.compile(r"\b(AND|OR|NOT|And|Or|Not)\b"), "{0!r} is written in lower case "
                                                  "(did you mean {1!r}?)"),
)
_QUOTED = re.compile(r"\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'")


def _slip(source: str) -> ExpressionError | None:
    """A hint for a condition that does not parse because of a usual slip, at its
    position; None when it is another mistake."""
    blank = _QUOTED.sub(lambda m: " " * len(m.group()), source)  # text is not code
    for pattern, message in _SLIPS:
        found = pattern.search(blank)
        if found is not None:
            word = found.group()
            line = blank.count("\n", 0, found.start()) + 1
            column = found.start() - (blank.rfind("\n", 0, found.start()) + 1) + 1
            return ExpressionError("invalid condition: " + message.format(word, word.lower()),
                                   line, column)
    return None


def _unquoted(node: ast.expr) -> ast.Name | None:
    """A bare word where a value is compared, most likely text without its quotes."""
    if isinstance(node, ast.Name) and node.id not in _LITERAL_NAMES and \
            node.id not in ("event", "customer") and not node.id.startswith("_"):
        return node
    return None


class _Checker:
    """Walks the parsed condition, refuses what is not whitelisted, and folds the
    literal collections (so both evaluators share the same constant objects)."""

    def __init__(self, customer_fields: set[str], event_fields: set[str]):
        self.customer_fields = customer_fields
        self.event_fields = event_fields

    def visit(self, node: ast.AST) -> ast.expr:
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            raise _fail(node, f"{_describe(node)} is not allowed in a condition")
        result = method(node)
        return ast.copy_location(result, node)

    def visit_Constant(self, node: ast.Constant) -> ast.expr:
        if not isinstance(node.value, str | int | float | bool | type(None)):
            raise _fail(node, f"literal {node.value!r} is not allowed")
        return node

    def visit_Name(self, node: ast.Name) -> ast.expr:
        if node.id in _LITERAL_NAMES:
            return ast.Constant(_LITERAL_NAMES[node.id])
        if node.id.startswith("_"):
            raise _fail(node, f"names starting with '_' are not allowed: {node.id!r}")
        if node.id in ("event", "customer"):
            raise _fail(node, f"{node.id!r} alone is not a value; read a field, "
                              f"like {node.id}.{'type' if node.id == 'event' else 'capital'}")
        raise _fail(node, f"unknown name {node.id!r}; read fields as event.{node.id} "
                          f"or customer.FIELD")

    def visit_Attribute(self, node: ast.Attribute) -> ast.expr:
        base = node.value
        if node.attr.startswith("_"):
            raise _fail(node, f"names starting with '_' are not allowed: {node.attr!r}")
        if not isinstance(base, ast.Name) or base.id not in ("event", "customer"):
            raise _fail(node, "only event.FIELD and customer.FIELD can be read")
        if base.id == "customer":
            if node.attr not in CUSTOMER_FIELDS:
                raise _fail(node, f"customer.{node.attr} is not a customer field"
                                  f"{suggest(node.attr, CUSTOMER_FIELDS)}; "
                                  f"fields: {', '.join(CUSTOMER_FIELDS)}")
            self.customer_fields.add(node.attr)
        elif node.attr not in EVENT_CORE:
            self.event_fields.add(node.attr)
        return ast.Attribute(value=ast.Name(base.id, ast.Load()), attr=node.attr, ctx=ast.Load())

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.expr:
        return ast.BoolOp(op=node.op, values=[self.visit(v) for v in node.values])

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.expr:
        if not isinstance(node.op, ast.Not | ast.USub | ast.UAdd):
            raise _fail(node, f"operator {_describe(node.op)} is not allowed")
        return ast.UnaryOp(op=node.op, operand=self.visit(node.operand))

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        if type(node.op) not in _BINOPS:
            instead = {ast.BitAnd: " (did you mean 'and'?)", ast.BitOr: " (did you mean 'or'?)"}
            raise _fail(node, f"operator {_describe(node.op)} is not allowed"
                              f"{instead.get(type(node.op), ' (use + - * / // %)')}")
        return ast.BinOp(left=self.visit(node.left), op=node.op, right=self.visit(node.right))

    def visit_Compare(self, node: ast.Compare) -> ast.expr:
        for op in node.ops:
            if type(op) not in _CMPOPS:
                raise _fail(node, f"comparison {_describe(op)} is not allowed "
                                  "(use == != < <= > >= in, not in)")
        if any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
            # event.type == delivery: a word that can only be text; but for
            # amount > 3 the existing hint (event.amount) is the likely one
            for side in (node.left, *node.comparators):
                items = side.elts if isinstance(side, ast.List | ast.Tuple | ast.Set) else [side]
                for item in items:
                    word = _unquoted(item)
                    if word is not None:
                        raise _fail(word, f"unknown name {word.id!r} (did you mean "
                                          f'"{word.id}" in quotes? a field is '
                                          f"event.{word.id})")
        return ast.Compare(left=self.visit(node.left), ops=node.ops,
                           comparators=[self.visit(c) for c in node.comparators])

    def visit_Call(self, node: ast.Call) -> ast.expr:
        if not isinstance(node.func, ast.Name):
            raise _fail(node, "only registered functions can be called, like len(event.sku)")
        name = node.func.id
        if name.startswith("_") or name not in FUNCTIONS:
            raise _fail(node, f"unknown function {name!r}{suggest(name, FUNCTIONS)}; "
                              f"functions: {', '.join(sorted(FUNCTIONS))}")
        if node.keywords:
            raise _fail(node, "keyword arguments are not allowed")
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise _fail(arg, "*arguments are not allowed")
            args.append(self.visit(arg))
        return ast.Call(func=ast.Name(name, ast.Load()), args=args, keywords=[])

    def _collection(self, node: ast.List | ast.Tuple | ast.Set) -> ast.expr:
        items = [self.visit(e) for e in node.elts]
        if all(isinstance(i, ast.Constant) for i in items):
            values = tuple(i.value for i in items)  # type: ignore[attr-defined]
            try:
                return ast.Constant(frozenset(values))
            except TypeError:  # pragma: no cover - literals are hashable
                return ast.Constant(values)
        return ast.Tuple(elts=items, ctx=ast.Load())

    visit_List = visit_Tuple = visit_Set = _collection


def _describe(node: ast.AST) -> str:
    names = {
        "Pow": "'**'", "BitAnd": "'&'", "BitOr": "'|'", "BitXor": "'^'", "LShift": "'<<'",
        "RShift": "'>>'", "Invert": "'~'", "Is": "'is'", "IsNot": "'is not'",
        "MatMult": "'@'", "Subscript": "indexing ([...])", "Lambda": "lambda",
        "NamedExpr": "':='", "IfExp": "'x if c else y'", "ListComp": "a comprehension",
        "GeneratorExp": "a comprehension", "DictComp": "a comprehension",
        "SetComp": "a comprehension", "Dict": "a dict literal", "JoinedStr": "an f-string",
        "Await": "await", "Yield": "yield", "Starred": "'*'", "Slice": "a slice",
    }
    return names.get(type(node).__name__, type(node).__name__)


def _event_types(tree: ast.expr) -> frozenset[str] | None:
    """The event types a condition can match, when it says so plainly."""
    if isinstance(tree, ast.BoolOp):
        sets = [_event_types(v) for v in tree.values]
        if isinstance(tree.op, ast.And):
            known = [s for s in sets if s is not None]
            return frozenset.intersection(*known) if known else None
        if any(s is None for s in sets):
            return None
        return frozenset().union(*sets)  # type: ignore[arg-type]
    if isinstance(tree, ast.Compare) and len(tree.ops) == 1:
        left, op, right = tree.left, tree.ops[0], tree.comparators[0]
        is_type = (isinstance(left, ast.Attribute) and left.attr == "type"
                   and isinstance(left.value, ast.Name) and left.value.id == "event")
        if is_type and isinstance(right, ast.Constant):
            if isinstance(op, ast.Eq) and isinstance(right.value, str):
                return frozenset({right.value})
            if isinstance(op, ast.In) and isinstance(right.value, frozenset):
                return frozenset(v for v in right.value if isinstance(v, str))
    return None


# -- the compiled evaluator ----------------------------------------------------------

class _Lowering(ast.NodeTransformer):
    """Rewrites a checked tree into plain Python over (ev, pr, cu). It builds new
    nodes and never changes the checked tree, which the interpreter keeps."""

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.expr:
        return ast.BoolOp(op=node.op, values=[self.visit(v) for v in node.values])

    def visit_Tuple(self, node: ast.Tuple) -> ast.expr:
        return ast.Tuple(elts=[self.visit(e) for e in node.elts], ctx=ast.Load())

    def visit_Attribute(self, node: ast.Attribute) -> ast.expr:
        assert isinstance(node.value, ast.Name)
        if node.value.id == "customer":
            return ast.Attribute(value=ast.Name("cu", ast.Load()), attr=node.attr, ctx=ast.Load())
        if node.attr in EVENT_CORE:
            return ast.Attribute(value=ast.Name("ev", ast.Load()), attr=node.attr, ctx=ast.Load())
        return ast.Call(
            func=ast.Attribute(value=ast.Name("pr", ast.Load()), attr="get", ctx=ast.Load()),
            args=[ast.Constant(node.attr), ast.Name("_MISSING", ast.Load())], keywords=[])

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        return ast.Call(func=ast.Name("_op_" + type(node.op).__name__, ast.Load()),
                        args=[self.visit(node.left), self.visit(node.right)], keywords=[])

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.expr:
        if isinstance(node.op, ast.Not):
            return ast.UnaryOp(op=node.op, operand=self.visit(node.operand))
        return ast.Call(func=ast.Name("_op_" + type(node.op).__name__, ast.Load()),
                        args=[self.visit(node.operand), ast.Constant(0)], keywords=[])

    def visit_Constant(self, node: ast.Constant) -> ast.expr:
        if isinstance(node.value, frozenset | tuple):
            name = f"_k{len(self.constants)}"
            self.constants[name] = node.value
            return ast.Name(name, ast.Load())
        return node

    def visit_Call(self, node: ast.Call) -> ast.expr:
        assert isinstance(node.func, ast.Name)
        args = [self.visit(a) for a in node.args]
        return ast.Call(func=ast.Name("_fn_" + node.func.id, ast.Load()), args=args, keywords=[])

    def visit_Compare(self, node: ast.Compare) -> ast.expr:
        left = self.visit(node.left)
        rights = [self.visit(c) for c in node.comparators]
        # `in` over a literal set is native (MISSING is never in it); any other
        # membership test goes through a helper so that a missing side is false.
        helpers = [
            "_not_in" if isinstance(op, ast.NotIn)
            else "_in" if isinstance(op, ast.In) and not _is_literal_set(right)
            else None
            for op, right in zip(node.ops, node.comparators, strict=True)
        ]
        if not any(helpers):
            return ast.Compare(left=left, ops=node.ops, comparators=rights)
        pairs = []
        for op, right, helper in zip(node.ops, rights, helpers, strict=True):
            if helper:
                pairs.append(ast.Call(func=ast.Name(helper, ast.Load()),
                                      args=[left, right], keywords=[]))
            else:
                pairs.append(ast.Compare(left=left, ops=[op], comparators=[right]))
            left = right
        return pairs[0] if len(pairs) == 1 else ast.BoolOp(op=ast.And(), values=pairs)


def _is_literal_set(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, frozenset)


def _guarded(function: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        if any(a is MISSING for a in args):
            return MISSING
        return function(*args)
    return call


def _build(tree: ast.expr, source: str, functions: dict[str, Callable[..., Any]]
           ) -> Callable[[Any, Any, Any], bool]:
    lowering = _Lowering()
    lowering.constants = {}  # type: ignore[attr-defined]
    body = lowering.visit(tree)
    args = ast.arguments(posonlyargs=[], args=[ast.arg("ev"), ast.arg("pr"), ast.arg("cu")],
                         kwonlyargs=[], kw_defaults=[], defaults=[])
    handler = ast.ExceptHandler(
        type=ast.Name("Exception", ast.Load()), name=None,
        body=[ast.Return(ast.Call(func=ast.Name("_slow", ast.Load()),
                                  args=[ast.Name(n, ast.Load()) for n in ("ev", "pr", "cu")],
                                  keywords=[]))])
    fast = ast.Return(ast.IfExp(test=body, body=ast.Constant(True), orelse=ast.Constant(False)))
    function = ast.FunctionDef(
        name="condition", args=args,
        body=[ast.Try(body=[fast], handlers=[handler], orelse=[], finalbody=[])],
        decorator_list=[], returns=None, type_params=[])
    module = ast.fix_missing_locations(ast.Module(body=[function], type_ignores=[]))
    namespace: dict[str, Any] = {
        "__builtins__": {"Exception": Exception},
        "_MISSING": MISSING,
        **{"_op_" + kind.__name__: op for kind, op in (*_BINOPS.items(), *_UNARY.items())},
        "_in": _in,
        "_not_in": _not_in,
        "_slow": lambda ev, pr, cu: bool(_interpret(tree, ev, pr, cu, functions)),
        **lowering.constants,  # type: ignore[attr-defined]
        **{"_fn_" + name: _guarded(fn) for name, fn in functions.items()},
    }
    exec(compile(module, f"<condition {source!r}>", "exec"), namespace)
    return namespace["condition"]


# -- the reference interpreter -------------------------------------------------------

def _interpret(node: ast.expr, ev: Any, pr: Any, cu: Any,
               fns: dict[str, Callable[..., Any]]) -> Any:
    kind = type(node)
    if kind is ast.Constant:
        return node.value  # type: ignore[attr-defined]
    if kind is ast.Attribute:
        base = node.value.id  # type: ignore[attr-defined]
        attr = node.attr  # type: ignore[attr-defined]
        if base == "customer":
            return getattr(cu, attr)
        if attr in EVENT_CORE:
            return getattr(ev, attr)
        return pr.get(attr, MISSING)
    if kind is ast.BoolOp:
        result: Any = None
        for value in node.values:  # type: ignore[attr-defined]
            result = _interpret(value, ev, pr, cu, fns)
            if isinstance(node.op, ast.And) != bool(result):  # type: ignore[attr-defined]
                return result
        return result
    if kind is ast.UnaryOp:
        operand = _interpret(node.operand, ev, pr, cu, fns)  # type: ignore[attr-defined]
        if isinstance(node.op, ast.Not):  # type: ignore[attr-defined]
            return not operand
        return _UNARY[type(node.op)](operand, 0)  # type: ignore[attr-defined]
    if kind is ast.BinOp:
        left = _interpret(node.left, ev, pr, cu, fns)  # type: ignore[attr-defined]
        right = _interpret(node.right, ev, pr, cu, fns)  # type: ignore[attr-defined]
        if left is MISSING or right is MISSING:
            return MISSING
        try:
            return _BINOPS[type(node.op)](left, right)  # type: ignore[attr-defined]
        except Exception:
            return MISSING
    if kind is ast.Compare:
        left = _interpret(node.left, ev, pr, cu, fns)  # type: ignore[attr-defined]
        for op, comparator in zip(node.ops, node.comparators, strict=True):  # type: ignore[attr-defined]
            right = _interpret(comparator, ev, pr, cu, fns)
            if left is MISSING or right is MISSING:
                return False
            try:
                if not _CMPOPS[type(op)](left, right):
                    return False
            except Exception:
                return False
            left = right
        return True
    if kind is ast.Call:
        args = [_interpret(a, ev, pr, cu, fns) for a in node.args]  # type: ignore[attr-defined]
        if any(a is MISSING for a in args):
            return MISSING
        try:
            return fns[node.func.id](*args)  # type: ignore[attr-defined]
        except Exception:
            return MISSING
    if kind is ast.Tuple:
        return tuple(_interpret(e, ev, pr, cu, fns) for e in node.elts)  # type: ignore[attr-defined]
    raise AssertionError(f"unchecked node {kind.__name__}")  # pragma: no cover
