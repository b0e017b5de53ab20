"""Reading rule files: YAML with positions, validated as a whole before use.

Every mistake is collected and reported as ``file:line:column: message`` (with a
suggestion for a misspelt key, rule or action name), once: what follows from a
misspelt key's absence is not reported again. A rule set with any mistake raises
:class:`~retention.errors.RuleFileError` and nothing of it is used.

Rule files may come from anyone who can edit them, so what they can cost is
bounded (the limits below, the size checked before a file is read), and they are
plain YAML: an explicit tag (``!!python/object``, even ``!!str``) is an error.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import attrs
import yaml

from ..capital import HalfLifeFade, LinearFade, RateFade
from ..errors import RuleFileError, RuleProblem
from ..times import TimeFormatError, parse_duration
from . import matchers
from .expressions import Condition, ExpressionError
from .model import (
    ACTION_KINDS,
    CATEGORIES,
    Action,
    ActionRef,
    CapitalConfig,
    Consent,
    Level,
    Licence,
    Pressure,
    Recognition,
    Recovery,
    Repeat,
    Rule,
    RuleSet,
    Silence,
    SourceFile,
)

Pos = tuple[int, int]

TOP_KEYS = ("capital", "rules", "silence", "licence", "levels", "recognition", "pressure",
            "consent", "actions", "description")
#: The keys each mapping of a rule file may hold (the JSON Schema mirrors them).
KEYS: dict[str, tuple[str, ...]] = {
    "capital": ("initial", "min", "max", "opens_on"),
    "rule": ("when", "points", "fades_over", "half_life", "fades", "keep", "repeat",
             "category", "then", "recovers", "match", "within", "refund", "bonus",
             "description", "pattern", "matcher"),
    "fades": ("rate", "per"),
    "repeat": ("within", "factor"),
    "level": ("name", "below", "rearm", "then", "holdout", "description"),
    "recognition": ("every", "when", "after", "then", "description", "matcher"),
    "after": ("purchases", "or_spent", "within"),
    "silence": ("after", "rate_per_day", "contacts"),
    "licence": ("clean_for", "points", "up_to"),
    "pressure": ("max", "per", "kinds"),
    "consent": ("withdraw_on", "restore_on"),
    "action": ("kind", "via", "template", "params", "max_age", "description"),
}
_SINGULAR = {"rules": "rule", "recognition": "recognition", "actions": "action"}

#: Names of rules, levels, recognition rewards and actions: they end up in decision
#: ids, logs, CSV columns and URLs, so no spaces, line breaks or punctuation.
NAME_LENGTH = 64
_NAME = re.compile(rf"[A-Za-z][A-Za-z0-9_\-]{{0,{NAME_LENGTH - 1}}}")
NAME_RULE = (f"letters, digits, _ and -, starting with a letter, at most {NAME_LENGTH} "
             "characters")


def valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


# -- limits ----------------------------------------------------------------------------

#: The rule files of a rule set together (checked before any is parsed).
MAX_BYTES = 2**20
#: Entries of each named section across all files, and levels.
MAX_ENTRIES = {"rules": 1000, "recognition": 1000, "actions": 1000}
MAX_LEVELS = 100
#: How deep mappings and lists may nest (a rule file needs about six).
MAX_DEPTH = 32


# -- YAML with positions ---------------------------------------------------------------

class LMap(dict):
    """A mapping that remembers where it, its keys and its values were written."""

    pos: Pos = (1, 1)
    #: keys of it were refused (a merge key): what it lacks is no new mistake
    incomplete: bool = False
    key_pos: dict[Any, Pos]
    val_pos: dict[Any, Pos]
    val_offset: dict[Any, int | None]


class LList(list):
    pos: Pos = (1, 1)
    item_pos: list[Pos]
    item_offset: list[int | None]


def _mark(node: yaml.Node) -> Pos:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _text_offset(node: yaml.Node) -> int | None:
    """Columns between a scalar's mark and its text (the opening quote); None when
    the scalar spans several lines, where columns inside it cannot be mapped back."""
    if not isinstance(node, yaml.ScalarNode):
        return 0
    if node.style in ("|", ">") or node.start_mark.line != node.end_mark.line:
        return None
    return 1 if node.style in ("'", '"') else 0


#: nodes a rule file may expand to (aliases can multiply a small text enormously)
MAX_NODES = 100_000


class _RuleYAML(yaml.SafeLoader):
    """YAML's safe loader that remembers which nodes carry an explicit tag (``!!str``,
    ``!!python/object``...), so the builder refuses them at their position instead of
    silently dropping or obeying them, and that reads dates as plain text (a rule file
    holds no timestamps; a ``2026-01-01`` in params stays JSON)."""

    yaml_implicit_resolvers: ClassVar[dict[str, list[Any]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers
                if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        tag = getattr(event, "tag", None)  # an alias event has none
        node = super().compose_node(parent, index)
        if tag is not None:
            node.explicit_tag = tag
        return node


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org,") \
        else tag


class _TooBig(Exception):
    pass


class _TooDeep(Exception):
    pass


class _Unbuilt(Exception):
    """A value YAML cannot build (reported where it is)."""


class _Builder:
    def __init__(self, file: str, problems: list[RuleProblem]):
        self.file = file
        self.problems = problems
        self.constructor = _RuleYAML("")
        self.built = 0

    def build(self, node: yaml.Node, depth: int = 0) -> Any:
        self.built += 1
        if self.built > MAX_NODES:
            raise _TooBig
        if depth > MAX_DEPTH:
            raise _TooDeep(_mark(node))
        tag = getattr(node, "explicit_tag", None)
        if tag is not None:
            self._error(_mark(node), f"YAML tag {_tag_name(tag)!r} is not allowed in a rule "
                                     "file: write plain values (quote a text, \"5\")")
            if isinstance(node, yaml.ScalarNode):  # read as if untagged: no knock-on error
                plain = node.style is None
                node = yaml.ScalarNode(
                    self.constructor.resolve(yaml.ScalarNode, node.value, (plain, not plain)),
                    node.value, node.start_mark, node.end_mark, style=node.style)
        if isinstance(node, yaml.MappingNode):
            out = LMap()
            out.pos, out.key_pos, out.val_pos, out.val_offset = _mark(node), {}, {}, {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._error(_mark(key_node), "merge keys (<<) are not supported in rule "
                                                 "files: write the keys out")
                    out.incomplete = True
                    continue
                key = self.build(key_node, depth + 1)
                if isinstance(key, dict | list):
                    self._error(_mark(key_node), "a key must be a plain name")
                    continue
                if key in out:
                    self._error(_mark(key_node), f"duplicate key {key!r}")
                    continue
                try:
                    out[key] = self.build(value_node, depth + 1)
                except _Unbuilt:  # (reported): the key is absent, and no new mistake
                    out.incomplete = True
                    continue
                out.key_pos[key] = _mark(key_node)
                out.val_pos[key] = _mark(value_node)
                out.val_offset[key] = _text_offset(value_node)
            return out
        if isinstance(node, yaml.SequenceNode):
            items = LList()
            items.pos, items.item_pos, items.item_offset = _mark(node), [], []
            for item in node.value:
                items.append(self.build(item, depth + 1))
                items.item_pos.append(_mark(item))
                items.item_offset.append(_text_offset(item))
            return items
        try:
            return self.constructor.construct_object(node, deep=True)
        except (ValueError, OverflowError):  # (a number of thousands of digits, say)
            self._error(_mark(node), f"invalid value {node.value[:20]!r}"
                                     f"{'...' if len(node.value) > 20 else ''}: not a number "
                                     "or text this file can hold")
            raise _Unbuilt from None

    def _error(self, pos: Pos, message: str) -> None:
        self.problems.append(RuleProblem(file=self.file, line=pos[0], column=pos[1],
                                         message=message))


def _parse(file: str, text: str, problems: list[RuleProblem]) -> LMap | None:
    try:
        node = yaml.compose(text, Loader=_RuleYAML)
    except RecursionError:
        problems.append(RuleProblem(file=file, line=1, column=1,
                                    message="invalid YAML: nested too deeply"))
        return None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "invalid YAML"
        problems.append(RuleProblem(file=file, line=line, column=col,
                                    message=f"invalid YAML: {problem}"))
        return None
    except yaml.YAMLError as exc:
        problems.append(RuleProblem(file=file, line=1, column=1, message=f"invalid YAML: {exc}"))
        return None
    if node is None:
        out = LMap()
        out.pos, out.key_pos, out.val_pos, out.val_offset = (1, 1), {}, {}, {}
        return out
    try:
        data = _Builder(file, problems).build(node)
    except _Unbuilt:  # (reported at its position)
        return None
    except yaml.MarkedYAMLError as exc:  # a value YAML cannot build, at its position
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problems.append(RuleProblem(file=file, line=line, column=col,
                                    message=f"invalid YAML: {exc.problem or exc.context}"))
        return None
    except yaml.YAMLError as exc:
        problems.append(RuleProblem(file=file, line=1, column=1, message=f"invalid YAML: {exc}"))
        return None
    except _TooDeep as exc:
        line, column = exc.args[0]
        problems.append(RuleProblem(file=file, line=line, column=column,
                                    message=f"nested more than {MAX_DEPTH} levels deep"))
        return None
    except (_TooBig, RecursionError, MemoryError):
        problems.append(RuleProblem(
            file=file, line=1, column=1,
            message=f"too large: it expands to more than {MAX_NODES:,} values "
                    "(nested too deeply, or aliases that repeat themselves)"))
        return None
    except (ValueError, OverflowError) as exc:  # a value YAML itself cannot build
        problems.append(RuleProblem(file=file, line=1, column=1, message=f"invalid value: {exc}"))
        return None
    if not isinstance(data, LMap):
        problems.append(RuleProblem(file=file, line=_mark(node)[0], column=_mark(node)[1],
                                    message="a rule file is a mapping of sections "
                                            f"({', '.join(TOP_KEYS[:-1])})"))
        return None
    return data


# -- validation ------------------------------------------------------------------------

def _suggest(word: object, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Section:
    """Reads one mapping of a rule file, recording problems at their positions."""

    def __init__(self, owner: _Validator, file: str, mapping: LMap, where: str):
        self.owner, self.file, self.m, self.where = owner, file, mapping, where
        #: known keys an unknown key was probably meant to be (``pionts``: points);
        #: their absence is reported once, as that unknown key, and nothing else is
        #: derived from it (no "needs 'points'", no check against the default)
        self.meant: set[str] = set()

    def error(self, key: str | None, message: str, *, at_key: bool = False) -> None:
        if key is None or key not in self.m.key_pos:
            pos = self.m.pos
        else:
            pos = self.m.key_pos[key] if at_key else self.m.val_pos[key]
        self.owner.error(self.file, pos, message)

    def only(self, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        for key in self.m:
            if key not in allowed:
                self.error(key, f"unknown key {key!r} in {self.where}{_suggest(key, allowed)}",
                           at_key=True)
                self.meant.update(difflib.get_close_matches(str(key), allowed, n=1,
                                                            cutoff=0.6))

    def guessed(self, *keys: str) -> bool:
        """Whether one of ``keys`` is absent but was meant (written misspelt): what
        would follow from its absence or its default is not a mistake of its own."""
        return any(key not in self.m and (key in self.meant or self.m.incomplete)
                   for key in keys)

    def needs(self, key: str, message: str) -> None:
        """Report a required ``key`` that is absent, unless it was written misspelt."""
        if not self.guessed(key):
            self.error(None, message)

    def has(self, key: str) -> bool:
        return key in self.m

    def raw(self, key: str) -> Any:
        return self.m.get(key)

    def number(self, key: str, default: float | None = None, *, low: float | None = None,
               high: float | None = None, required: bool = False,
               strict_low: bool = False) -> float | None:
        if key not in self.m:
            if required:
                self.needs(key, f"{self.where} needs {key!r}")
            return default
        value = self.m[key]
        if not _is_number(value):
            self.error(key, f"{key} must be a number, got {value!r}")
            return default
        if low is not None and (value < low or (strict_low and value == low)):
            bound = "more than" if strict_low else "at least"
            self.error(key, f"{key} must be {bound} {low:g}, got {value!r}")
            return default
        if high is not None and value > high:
            self.error(key, f"{key} must be at most {high:g}, got {value!r}")
            return default
        return float(value)

    def integer(self, key: str, *, low: int, required: bool = False) -> int | None:
        if key not in self.m:
            if required:
                self.needs(key, f"{self.where} needs {key!r}")
            return None
        value = self.m[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.error(key, f"{key} must be a whole number of at least {low}, got {value!r}")
            return None
        return value

    def duration(self, key: str, *, required: bool = False) -> float | None:
        if key not in self.m:
            if required:
                self.needs(key, f"{self.where} needs {key!r} (a duration like 30d)")
            return None
        try:
            seconds = parse_duration(self.m[key])
        except TimeFormatError as exc:
            self.error(key, f"{key}: {exc}")
            return None
        if seconds <= 0:
            self.error(key, f"{key} must be longer than zero")
            return None
        return seconds

    def share(self, key: str) -> float | None:
        """A fraction in [0, 1], written 0.05 or "5%"."""
        value = self.m.get(key)
        if isinstance(value, str) and value.strip().endswith("%"):
            with contextlib.suppress(ValueError):
                value = float(value.strip()[:-1]) / 100.0
        if not _is_number(value) or not 0 <= value <= 1:
            self.error(key, f"{key} must be a share between 0 and 1 (or a percentage like 5%), "
                            f"got {self.m.get(key)!r}")
            return None
        return float(value)

    def names(self, key: str) -> frozenset[str] | None:
        if key not in self.m:
            return None
        value = self.m[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.error(key, f"{key} must be a list of names, got {value!r}")
            return None
        if not value:
            self.error(key, f"{key} needs at least one name (remove the key for the default)")
            return None
        return frozenset(value)

    def text(self, key: str, *, required: bool = False) -> str | None:
        if key not in self.m:
            if required:
                self.needs(key, f"{self.where} needs {key!r}")
            return None
        value = self.m[key]
        if not isinstance(value, str) or not value.strip():
            self.error(key, f"{key} must be text, got {value!r}")
            return None
        return value

    def mapping(self, key: str, where: str) -> _Section | None:
        if key not in self.m:
            return None
        value = self.m[key]
        if value is None:
            self.error(key, f"{key} is empty; give its settings or remove the key", at_key=True)
            return None
        if not isinstance(value, LMap):
            self.error(key, f"{key} must be a mapping, got {value!r}")
            return None
        return _Section(self.owner, self.file, value, where)

    def condition(self, key: str, *, required: bool) -> Condition | None:
        source = self.text(key, required=required)
        if source is None:
            return None
        matcher = self.text("matcher") or matchers.DEFAULT
        compile = matchers.MATCHERS.get(matcher)
        if compile is None:
            known = sorted(matchers.MATCHERS)
            self.error("matcher", f"unknown matcher {matcher!r}{_suggest(matcher, known)}; "
                                  f"matchers: {', '.join(known) or 'none loaded'}")
            return None
        try:
            return compile(source)
        except ExpressionError as exc:
            line, col = self.m.val_pos[key]
            offset = self.m.val_offset.get(key)
            if offset is not None and exc.line == 1:  # a one-line scalar: exact column
                col += offset + exc.column - 1
            self.owner.error(self.file, (line, col), str(exc))
            return None
        except Exception as exc:  # a plugin's matcher: its failure is a load error too
            self.error(key, f"matcher {matcher!r} cannot compile this condition: "
                            f"{type(exc).__name__}: {exc}")
            return None


class _Validator:
    def __init__(self) -> None:
        self.problems: list[RuleProblem] = []

    def error(self, file: str, pos: Pos, message: str) -> None:
        self.problems.append(RuleProblem(file=file, line=pos[0], column=pos[1], message=message))


def _read_sources(path: Path, problems: list[RuleProblem]) -> list[SourceFile]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            problems.append(RuleProblem(file=str(path), line=1, column=1,
                                        message="no rule files (*.yaml) in this folder"))
    elif path.exists():
        files = [path]
    else:
        problems.append(RuleProblem(file=str(path), line=1, column=1,
                                    message="no such file or folder"))
        files = []
    sources = []
    total = 0
    for file in files:
        try:
            total += file.stat().st_size
        except OSError as exc:
            problems.append(RuleProblem(file=str(file), line=1, column=1,
                                        message=f"cannot read: {exc}"))
            continue
        if total > MAX_BYTES:  # refused before reading: no parse of 100 MB of comments
            problems.append(_too_large(str(file), total, several=len(files) > 1))
            return []
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(RuleProblem(file=str(file), line=1, column=1,
                                        message=f"cannot read: {exc}"))
            continue
        sources.append(SourceFile(path=str(file), text=text,
                                  sha256=hashlib.sha256(text.encode()).hexdigest()))
    return sources


def _too_large(file: str, size: int, *, several: bool) -> RuleProblem:
    what = "the rule files up to this one hold" if several else "this rule file holds"
    return RuleProblem(file=file, line=1, column=1,
                       message=f"too large: {what} {size:,} bytes; a rule set is limited to "
                               f"{MAX_BYTES:,} bytes (1 MiB)")


def load_rules(path: str | Path) -> RuleSet:
    """Load and validate a rule file, or a folder of them (read in name order)."""
    problems: list[RuleProblem] = []
    sources = _read_sources(Path(path), problems)
    if problems:
        raise RuleFileError(problems)
    return load_texts([(s.path, s.text) for s in sources])


def load_texts(texts: Iterable[tuple[str, str]]) -> RuleSet:
    """Load and validate rule files given as (name, YAML text) pairs, in order."""
    v = _Validator()
    parsed: list[tuple[str, LMap]] = []
    sources: list[SourceFile] = []
    texts = list(texts)
    total = 0
    for name, text in texts:
        try:
            total += len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:  # a lone surrogate, from a caller's str
            line = text.count("\n", 0, exc.start) + 1
            column = exc.start - (text.rfind("\n", 0, exc.start) + 1) + 1
            raise RuleFileError([RuleProblem(
                file=name, line=line, column=column,
                message=f"not text: a lone surrogate {text[exc.start]!r}")]) from None
        if total > MAX_BYTES:
            raise RuleFileError([_too_large(name, total, several=len(texts) > 1)])
    for name, text in texts:
        sources.append(SourceFile(path=name, text=text,
                                  sha256=hashlib.sha256(text.encode()).hexdigest()))
        data = _parse(name, text, v.problems)
        if data is not None:
            parsed.append((name, data))
    ruleset = _Compiler(v, parsed).compile(tuple(sources))
    if v.problems:
        raise RuleFileError(v.problems)
    assert ruleset is not None
    return ruleset


class _Compiler:
    """Validates the merged sections of all files and builds the RuleSet."""

    def __init__(self, v: _Validator, parsed: list[tuple[str, LMap]]):
        self.v = v
        self.parsed = parsed
        self.single: dict[str, _Section] = {}
        self.named: dict[str, list[tuple[str, _Section]]] = {
            "rules": [], "recognition": [], "actions": []}
        self.levels: list[tuple[_Section, int]] = []
        #: a section past its limit: nothing more is checked (it could take long)
        self.too_many = False
        #: top-level sections written misspelt in some file (``action:``)
        self.top_meant: set[str] = set()
        #: names refused as names (reported): a reference to one is no new mistake
        self.invalid: dict[str, set[Any]] = {k: set() for k in self.named}

    def _gather(self) -> None:
        seen_names: dict[str, dict[str, str]] = {k: {} for k in self.named}
        for file, data in self.parsed:
            top = _Section(self.v, file, data, "the rule file")
            top.only(TOP_KEYS)
            self.top_meant |= top.meant
            for key in ("capital", "silence", "licence", "pressure", "consent"):
                section = top.mapping(key, key)
                if section is None:
                    continue
                if key in self.single:
                    top.error(key, f"{key!r} is already set in {self.single[key].file}",
                              at_key=True)
                    continue
                self.single[key] = section
            for key in self.named:
                section = top.mapping(key, key)
                if section is None:
                    continue
                if len(self.named[key]) + len(section.m) > MAX_ENTRIES[key]:
                    top.error(key, f"too many {key}: a rule set has at most "
                                   f"{MAX_ENTRIES[key]:,}", at_key=True)
                    self.too_many = True
                    continue
                for name in section.m:
                    if not valid_name(name):
                        section.error(name, f"{name!r} is not a valid name ({NAME_RULE})",
                                      at_key=True)
                        self.invalid[key].add(name)
                        continue
                    if name in seen_names[key]:
                        section.error(name, f"{_SINGULAR[key]} {name!r} is already defined in "
                                            f"{seen_names[key][name]}", at_key=True)
                        continue
                    other = "recognition" if key == "rules" else "rules"
                    if key != "actions" and name in seen_names[other]:
                        section.error(name, f"{name!r} is already the name of a "
                                            f"{_SINGULAR[other]}; decisions name their cause, "
                                            "so names must differ", at_key=True)
                        continue
                    seen_names[key][name] = file
                    body = section.m[name]
                    if not isinstance(body, LMap):
                        section.error(name, f"{name} must be a mapping of settings")
                        continue
                    where = f"{_SINGULAR[key]} {name!r}"
                    self.named[key].append((name, _Section(self.v, file, body, where)))
            if "levels" not in data:
                continue
            levels = data["levels"]
            if levels is None:
                top.error("levels", "levels is empty; give a list or remove the key",
                          at_key=True)
                continue
            if not isinstance(levels, LList):
                top.error("levels", "levels must be a list like - {name: watch, below: 55}")
                continue
            if len(self.levels) + len(levels) > MAX_LEVELS:
                top.error("levels", f"too many levels: a rule set has at most {MAX_LEVELS}",
                          at_key=True)
                self.too_many = True
                continue
            for index, item in enumerate(levels):
                if not isinstance(item, LMap):
                    self.v.error(file, levels.item_pos[index],
                                 "a level is a mapping like {name: watch, below: 55}")
                    continue
                self.levels.append((_Section(self.v, file, item, "level"), index))

    def compile(self, sources: tuple[SourceFile, ...]) -> RuleSet | None:
        self._gather()
        if self.too_many:
            return None
        capital = self._capital()
        actions = self._actions()
        rules = self._rules(actions)
        levels = self._levels(actions, {r.name for r in rules})
        recognition = self._recognition(actions)
        silence = self._silence()
        licence = self._licence(capital)
        pressure = self._pressure()
        consent = self._consent()
        if self.v.problems:
            return None
        by_type: dict[str, list[Rule]] = {}
        for rule in rules:
            for kind in rule.condition.event_types or ():
                by_type.setdefault(kind, [])
        for rule in rules:
            types = rule.condition.event_types
            for kind, bucket in by_type.items():
                if types is None or kind in types:
                    bucket.append(rule)
        uses_customer = any(r.condition.customer_fields for r in rules) or any(
            r.condition is not None and r.condition.customer_fields for r in recognition)
        # the event types a reward can count: `after` counts purchases only
        def counted(rec: Recognition) -> frozenset[str] | None:
            if rec.every is None:
                types = rec.condition.event_types if rec.condition else None
                return frozenset({"purchase"}) & types if types else frozenset({"purchase"})
            assert rec.condition is not None
            return rec.condition.event_types

        rec_types = {rec.name: counted(rec) for rec in recognition}
        rec_by_type: dict[str, list[Recognition]] = {
            kind: [] for types in rec_types.values() for kind in (types or ())}
        for rec in recognition:
            for kind, bucket in rec_by_type.items():
                if rec_types[rec.name] is None or kind in rec_types[rec.name]:
                    bucket.append(rec)
        conditions = [r.condition for r in rules] + [
            r.condition for r in recognition if r.condition is not None]
        uses_level = any("level" in c.customer_fields for c in conditions)
        return RuleSet(
            capital=capital, rules=tuple(rules), silence=silence, licence=licence,
            levels=tuple(levels), recognition=tuple(recognition), pressure=pressure,
            consent=consent, actions=actions, sources=sources,
            by_type={k: tuple(v) for k, v in by_type.items()},
            any_type=tuple(r for r in rules if r.condition.event_types is None),
            recognition_by_type={k: tuple(v) for k, v in rec_by_type.items()},
            recognition_any=tuple(r for r in recognition if rec_types[r.name] is None),
            uses_customer=uses_customer, uses_level=uses_level,
        )

    # each section ---------------------------------------------------------------------

    def _capital(self) -> CapitalConfig:
        s = self.single.get("capital")
        if s is None:
            return CapitalConfig()
        s.only(KEYS["capital"])
        low = s.number("min", 0.0)
        high = s.number("max", 100.0)
        initial = s.number("initial", 70.0)
        opens = s.names("opens_on") or frozenset({"purchase"})
        if s.guessed("min", "max", "initial"):
            pass  # a bound written misspelt: its default proves nothing
        elif low is not None and high is not None and low >= high:
            s.error("max", f"max ({high:g}) must be more than min ({low:g})")
        elif initial is not None and low is not None and high is not None and \
                not low <= initial <= high:
            s.error("initial", f"initial ({initial:g}) must lie between min ({low:g}) "
                               f"and max ({high:g})")
        return CapitalConfig(initial=initial or 0.0, min=low or 0.0, max=high or 0.0,
                             opens_on=opens)

    def _then(self, s: _Section, actions: dict[str, Action]) -> tuple[ActionRef, ...]:
        if "then" not in s.m:
            return ()
        value = s.m["then"]
        if isinstance(value, str | LMap):
            value = [value]
        if not isinstance(value, list):
            s.error("then", "then must be a list of action names")
            return ()
        refs = []
        for index, item in enumerate(value):
            pos = value.item_pos[index] if isinstance(value, LList) else s.m.val_pos["then"]
            params: dict[str, Any] = {}
            if isinstance(item, LMap) and len(item) == 1:
                name, given = next(iter(item.items()))
                if given is not None and not isinstance(given, dict):
                    self.v.error(s.file, pos, f"parameters of {name!r} must be a mapping")
                    continue
                params = _plain(given or {})
            elif isinstance(item, str):
                name = item
            else:
                self.v.error(s.file, pos, "an action is a name, or {name: {parameters}}")
                continue
            if name in self.broken_actions or name in self.invalid["actions"]:
                continue  # its own declaration is reported already
            if name not in actions:
                if "actions" in self.top_meant:
                    continue  # the actions section itself is misspelt: reported there
                declared = self.declared_actions
                hint = _suggest(name, declared)
                self.v.error(s.file, pos, f"unknown action {name!r}{hint}; declare it "
                                          "under actions: with its kind and via")
                continue
            refs.append(ActionRef(name=name, params=params))
        return tuple(refs)

    def _actions(self) -> dict[str, Action]:
        self.declared_actions = [name for name, _ in self.named["actions"]]
        self.broken_actions: set[str] = set()
        actions = {}
        for name, s in self.named["actions"]:
            s.only(KEYS["action"])
            kind = s.text("kind", required=True)
            if kind is not None and kind not in ACTION_KINDS:
                s.error("kind", f"unknown kind {kind!r}{_suggest(kind, ACTION_KINDS)}; "
                                f"kinds: {', '.join(ACTION_KINDS)}")
                kind = None
            via = s.text("via", required=kind in ("service", "marketing"))
            params: dict[str, Any] = {}
            if "params" in s.m:
                if isinstance(s.m["params"], dict):
                    params.update(_plain(s.m["params"]))
                else:
                    s.error("params", "params must be a mapping")
            template = s.text("template")
            if template:
                params["template"] = template
            max_age = s.duration("max_age")
            if max_age is not None and kind == "in_purchase":
                s.error("max_age", "an in_purchase action is answered in the purchase and "
                                   "never expires: max_age does not apply")
            if kind is not None:
                actions[name] = Action(name=name, kind=kind, via=via, params=params,
                                       max_age=max_age)
            else:
                self.broken_actions.add(name)
        return actions

    def _fade(self, s: _Section) -> Any:
        given = [k for k in ("fades_over", "half_life", "fades") if k in s.m]
        if len(given) > 1:
            s.error(given[1], f"choose one way to fade, not {' and '.join(given)}", at_key=True)
            return None
        if not given:
            return None
        key = given[0]
        if key == "fades_over":
            span = s.duration("fades_over")
            return LinearFade(span) if span else None
        if key == "half_life":
            span = s.duration("half_life")
            return HalfLifeFade(span) if span else None
        inner = s.mapping("fades", "fades")
        if inner is None:
            return None
        inner.only(KEYS["fades"])
        if "rate" not in inner.m:
            inner.needs("rate", "fades needs a rate, like {rate: 5%, per: 30d}")
            return None
        rate = inner.share("rate")
        per = inner.duration("per", required=True)
        if rate is not None and rate <= 0:
            inner.error("rate", "rate must be more than 0%")
            return None
        if rate is not None and rate >= 1:
            # (1 - 100%) ** (d / per) is gone the moment after the incident
            inner.error("rate", "rate must be less than 100% (an incident that is "
                                "forgotten at once takes no points: remove them)")
            return None
        return RateFade(rate, per) if rate is not None and per else None

    def _rules(self, actions: dict[str, Action]) -> list[Rule]:
        known = [name for name, _ in self.named["rules"]]
        #: the points of each rule; None when they are written misspelt (unknown)
        points_of: dict[str, float | None] = {}
        for name, s in self.named["rules"]:
            s.only(KEYS["rule"])
            value = s.m.get("points", 0)
            points_of[name] = None if s.guessed("points") else (
                value if _is_number(value) else 0)
        recovered: dict[str, list[str]] = {}
        rules: list[Rule] = []
        for name, s in self.named["rules"]:
            if "pattern" in s.m:
                s.error("pattern", "multi-event pattern rules are not available in this "
                                   "version yet; write a single-event rule with 'when'",
                        at_key=True)
                continue
            condition = s.condition("when", required=True)
            points = s.number("points", 0.0)
            fade = self._fade(s)
            keep = 0.0
            if fade is not None and points is not None and points >= 0 and \
                    not s.guessed("points"):
                s.error("points", "only negative points fade: goodwill is banked")
            if "keep" in s.m:
                fades = ("fades_over", "half_life", "fades")
                if fade is None and not any(k in s.m for k in fades) and \
                        not s.guessed(*fades):
                    s.error("keep", "keep needs a fade (fades_over, half_life or fades)",
                            at_key=True)
                else:
                    keep = s.share("keep") or 0.0
            repeat = None
            inner = s.mapping("repeat", "repeat")
            if inner is not None:
                inner.only(KEYS["repeat"])
                within = inner.duration("within", required=True)
                factor = inner.number("factor", required=True, low=0.0, strict_low=True)
                if within and factor:
                    repeat = Repeat(within=within, factor=factor)
            recovery = None
            if "recovers" in s.m:
                target = s.text("recovers")
                if target is not None and target in self.invalid["rules"]:
                    target = None  # its name is reported already
                elif target is not None and target not in known:
                    s.error("recovers", f"unknown rule {target!r}{_suggest(target, known)}")
                    target = None
                elif target == name:
                    s.error("recovers", "a rule cannot recover itself")
                    target = None
                elif target is not None and points_of[target] is not None and \
                        points_of[target] >= 0:
                    s.error("recovers", f"rule {target!r} takes no points, so there is "
                                        "nothing to recover")
                    target = None
                match = s.text("match", required=True)
                within = s.duration("within", required=True)
                refund = s.share("refund") if "refund" in s.m else 1.0
                bonus = s.number("bonus", 0.0, low=0.0)
                if target and match and within and refund is not None and bonus is not None:
                    recovery = Recovery(rule=target, match=match, within=within,
                                        refund=refund, bonus=bonus)
                    recovered.setdefault(target, []).append(match)
            elif not s.guessed("recovers"):
                for key in ("match", "within", "refund", "bonus"):
                    if key in s.m:
                        s.error(key, f"{key} only makes sense with recovers: RULE", at_key=True)
            default = "recovery" if "recovers" in s.m else (
                "incident" if (points or 0) < 0 else "satisfaction")
            category = s.text("category") or default
            if category not in CATEGORIES:
                s.error("category", f"unknown category {category!r}"
                                    f"{_suggest(category, CATEGORIES)}; "
                                    f"categories: {', '.join(CATEGORIES)}")
            then = self._then(s, actions)
            if condition is None or points is None:
                continue
            rules.append(Rule(name=name, condition=condition, points=points, fade=fade,
                              keep=keep, repeat=repeat, category=category, then=then,
                              recovery=recovery, description=s.text("description")))
        return [
            r if r.name not in recovered else attrs.evolve(r, recovered_by=tuple(recovered[r.name]))
            for r in rules
        ]

    def _levels(self, actions: dict[str, Action], rule_names: set[str]) -> list[Level]:
        levels: list[Level] = []
        seen: set[str] = set()
        recognition = {name for name, _ in self.named["recognition"]}
        for s, _ in self.levels:
            s.only(KEYS["level"])
            name = s.text("name", required=True)
            if name is not None and not valid_name(name):
                s.error("name", f"{name!r} is not a valid name ({NAME_RULE})")
                name = None
            if name is not None:
                if name in seen:
                    s.error("name", f"level {name!r} is defined twice")
                elif name in rule_names or name in recognition:
                    s.error("name", f"level {name!r} has the name of a rule or reward; "
                                    "decisions name their cause, so names must differ")
                seen.add(name)
            below = s.number("below", required=True)
            rearm = s.number("rearm", 5.0, low=0.0)
            holdout = s.share("holdout") if "holdout" in s.m else 0.0
            if holdout is not None and holdout >= 1:
                s.error("holdout", "holdout must be less than 1 (some customers must be acted on)")
            then = self._then(s, actions)
            if name and below is not None and rearm is not None and holdout is not None:
                levels.append(Level(name=name, below=below, rearm=rearm, then=then,
                                    holdout=holdout))
        return levels

    def _recognition(self, actions: dict[str, Action]) -> list[Recognition]:
        out = []
        for name, s in self.named["recognition"]:
            s.only(KEYS["recognition"])
            then = self._then(s, actions)
            if not s.m.get("then") and not s.guessed("then"):
                s.error("then" if "then" in s.m else None,
                        f"recognition {name!r} needs then: [at least one action]")
            has_every, has_after = "every" in s.m, "after" in s.m
            if has_every == has_after:
                if has_every or not s.guessed("every", "after"):
                    s.error(None, f"recognition {name!r} needs exactly one of every: N "
                                  "or after: {purchases, or_spent, within}")
                continue
            if has_every:
                every = s.integer("every", low=1)
                condition = s.condition("when", required=True)
                if every and condition and then:
                    out.append(Recognition(name=name, then=then, condition=condition,
                                           every=every))
                continue
            condition = s.condition("when", required=False) if "when" in s.m else None
            inner = s.mapping("after", "after")
            if inner is None:
                continue
            inner.only(KEYS["after"])
            purchases = inner.integer("purchases", low=1)
            spent = inner.number("or_spent", low=0.0, strict_low=True)
            within = inner.duration("within")
            if "purchases" not in inner.m and "or_spent" not in inner.m:
                if not inner.guessed("purchases", "or_spent"):
                    inner.error(None, "after needs purchases: N, or_spent: AMOUNT, or both")
                continue
            if then and (purchases or spent):
                out.append(Recognition(name=name, then=then, condition=condition,
                                       purchases=purchases, spent=spent, within=within))
        return out

    def _silence(self) -> Silence | None:
        s = self.single.get("silence")
        if s is None:
            return None
        s.only(KEYS["silence"])
        after = s.duration("after", required=True)
        rate = s.number("rate_per_day", required=True, low=0.0)
        contacts = s.names("contacts")
        if after is None or rate is None:
            return None
        return Silence(after=after, rate_per_day=rate, contacts=contacts)

    def _licence(self, capital: CapitalConfig) -> Licence | None:
        s = self.single.get("licence")
        if s is None:
            return None
        s.only(KEYS["licence"])
        clean = s.duration("clean_for", required=True)
        points = s.number("points", required=True, low=0.0, strict_low=True)
        up_to = s.number("up_to", capital.initial)
        written = self.single.get("capital")
        if "capital" in self.top_meant or (written and written.guessed("min", "max", "initial")):
            pass  # capital is written misspelt: its bounds (and up_to's default) are unknown
        elif up_to is not None and not capital.min <= up_to <= capital.max:
            s.error("up_to", f"up_to ({up_to:g}) must lie between capital min ({capital.min:g}) "
                             f"and max ({capital.max:g})")
            up_to = None
        if clean is None or points is None or up_to is None:
            return None
        return Licence(clean_for=clean, points=points, up_to=up_to)

    def _pressure(self) -> Pressure | None:
        s = self.single.get("pressure")
        if s is None:
            return None
        s.only(KEYS["pressure"])
        most = s.integer("max", low=0, required=True)
        per = s.duration("per", required=True)
        kinds = s.names("kinds") or frozenset({"marketing"})
        for kind in kinds - set(ACTION_KINDS):
            s.error("kinds", f"unknown action kind {kind!r}{_suggest(kind, ACTION_KINDS)}")
        if most is None or per is None:
            return None
        return Pressure(max=most, per=per, kinds=kinds)

    def _consent(self) -> Consent:
        s = self.single.get("consent")
        if s is None:
            return Consent()
        s.only(KEYS["consent"])
        withdraw = s.names("withdraw_on") or frozenset({"unsubscribe"})
        restore = s.names("restore_on") or frozenset({"subscribe"})
        both = withdraw & restore
        if both:
            s.error("restore_on", f"{sorted(both)[0]!r} cannot both withdraw and restore consent")
        return Consent(withdraw_on=withdraw, restore_on=restore)


class Positions:
    """Where the parts of a loaded rule set are written, for messages about it after
    loading (``retention check``): ``of("actions", "call_customer", "via")`` is
    ``"rules/retail.yaml:71:47"``. A level is found by its name. The files are
    parsed again on the first question only."""

    def __init__(self, rules: RuleSet):
        self.sources = rules.sources
        self._parsed: list[tuple[str, LMap]] | None = None

    def of(self, *path: str) -> str:
        """The position of the value at ``path``; of the nearest part of it written
        when the value itself is not (an action with no ``template``)."""
        if self._parsed is None:
            self._parsed = [(s.path, data) for s in self.sources
                            if (data := _parse(s.path, s.text, [])) is not None]
        for file, data in self._parsed:
            node: Any = data
            near: Pos | None = None
            for key in path[:-1]:
                if isinstance(node, LList):  # the levels: by name
                    node = next((i for i in node if isinstance(i, LMap)
                                 and i.get("name") == key), None)
                    near = node.pos if node is not None else near
                elif isinstance(node, LMap) and key in node:
                    near, node = node.key_pos[key], node[key]
                else:
                    node = None
            if isinstance(node, LMap):
                line, column = node.val_pos.get(path[-1], near or node.pos)
                return f"{file}:{line}:{column}"
        return self.sources[0].path if self.sources else "rules"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


