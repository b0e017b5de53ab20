"""The ``retention`` command line."""

from __future__ import annotations

import json
import re
import sqlite3
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import click

from . import examples
from .engine import Engine
from .errors import EventError, LineError, RetentionError, RuleFileError
from .models import CORE_FIELDS, MAX_NUMBER, parse_json_line
from .output import format_options, render
from .rules.loader import load_rules
from .times import TimeFormatError, from_seconds, parse_duration, parse_instant


class _Group(click.Group):
    """Every project error becomes one line on standard error and exit 1: a user
    mistake never prints a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RuleFileError as exc:
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            sys.exit(1)
        except RetentionError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except sqlite3.Error as exc:  # a database damaged outside the engine
            click.echo(f"error: the database cannot be read: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="retention-engine")
def cli() -> None:
    """retention: tolerance capital, rupture thresholds and recognition rewards.

    \b
    Environment variables (an option given on the command line wins):
      RETENTION_DB               the SQLite database (--db)
      RETENTION_RULES            the rule file or folder (--rules)
      RETENTION_TOKEN            the bearer token of `retention serve` (--token)
      RETENTION_STANDARD_SECRET  the secret that signs POST /events (--secret)
      RETENTION_<SINK>_<KEY>     a sink or source setting (--set sink.key=value),
                                 e.g. RETENTION_EMAIL_HOST
    """


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--events", "events_path", type=click.Path(path_type=Path),
              help="A file of events (JSON Lines, or CSV): warn about each event field the "
                   "rules read that no event in it carries.")
@click.option("--templates", "templates_path", type=click.Path(path_type=Path),
              envvar="RETENTION_EMAIL_TEMPLATES",
              help="The email templates folder (RETENTION_EMAIL_TEMPLATES; default: "
                   "templates/ beside the rules), as the email sink finds it.")
@click.option("--route", "routes", multiple=True, metavar="VIA=SINK",
              help="As retention deliver and serve take it (crm_task=zendesk): a via "
                   "routed to a loaded sink is provided.")
def check(path: Path, events_path: Path | None, templates_path: Path | None,
          routes: tuple[str, ...]) -> None:
    """Validate a rule file or folder: print every mistake as file:line:column, or a summary.

    Also reported: an email action whose template file does not exist (an error),
    an action whose via no loaded sink provides (itself, or the sink --route sends
    it to), and with --events the event fields no event carries (warnings: printed,
    exit code still 0)."""
    routed = _pairs(routes, "--route")
    try:
        rules = load_rules(path)
    except RuleFileError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        count = len(exc.problems)
        click.echo(f"{count} error{'s' if count != 1 else ''}; nothing was loaded", err=True)
        sys.exit(1)
    from .rules.loader import Positions

    where = Positions(rules)
    errors = _template_errors(rules, where, templates_path or _templates(path))
    warnings = _sink_warnings(rules, where, routed)
    if events_path is not None:
        warnings += _field_warnings(rules, where, events_path)
    for line in warnings:
        click.echo(line, err=True)
    for line in errors:
        click.echo(line, err=True)
    if errors:
        click.echo(f"{_count(len(errors), 'errors')}; the rules are valid, but cannot work "
                   "as they are", err=True)
        sys.exit(1)
    note = f" ({_count(len(warnings), 'warnings')})" if warnings else ""
    click.echo(f"ok: {rules.summary()}{note}")


def _sink_warnings(rules: Any, where: Any, routes: dict[str, str] | None = None
                   ) -> list[str]:
    """An action whose via no loaded sink provides (``routes`` sending it to one counts):
    a plugin installed where the rules run may provide it (or --route), so a warning,
    once per via."""
    from . import plugins
    from .rules.expressions import suggest

    routes = routes or {}
    sinks = sorted(plugins.sinks())
    by_via: dict[str, list[str]] = {}
    for action in rules.actions.values():
        if action.via is not None and routes.get(action.via, action.via) not in sinks:
            by_via.setdefault(action.via, []).append(action.name)
    warnings = []
    for via, names in sorted(by_via.items()):
        actions = f"action{'s' if len(names) > 1 else ''} {', '.join(names)}"
        if via in routes:
            warnings.append(
                f"{where.of('actions', names[0], 'via')}: warning: --route {via}="
                f"{routes[via]} ({actions}): no loaded sink is named {routes[via]!r}"
                f"{suggest(routes[via], sinks)}; sinks: {', '.join(sinks) or 'none'}")
            continue
        warnings.append(
            f"{where.of('actions', names[0], 'via')}: warning: no loaded sink provides via "
            f"{via!r} ({actions}){suggest(via, sinks)}; sinks: {', '.join(sinks) or 'none'}."
            f" A plugin may provide it where the rules run (retention plugins), or --route "
            f"{via}=SINK")
    return warnings


def _template_errors(rules: Any, where: Any, folder: Path) -> list[str]:
    """Each email decision's template, found as the email sink finds it:
    ``<templates>/<template>.txt``, the ``template`` a ``then`` gives the action,
    else the action's own."""
    from .rules.expressions import suggest

    uses: dict[tuple[str, str | None], str] = {}  # (action, template) -> where written
    for action in rules.actions.values():
        if action.via == "email" and action.params.get("template"):
            uses[(action.name, action.params["template"])] = where.of(
                "actions", action.name, "template")
    causes = [(("rules", r.name), r.then) for r in rules.rules] + [
        (("levels", lv.name), lv.then) for lv in rules.levels] + [
        (("recognition", r.name), r.then) for r in rules.recognition]
    for path, then in causes:
        for ref in then:
            action = rules.actions[ref.name]
            if action.via != "email":
                continue
            if "template" in ref.params:
                uses.setdefault((ref.name, ref.params["template"]), where.of(*path, "then"))
            elif not action.params.get("template"):
                uses.setdefault((ref.name, None), where.of("actions", ref.name, "template"))
    existing = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
    there = (f"templates there: {', '.join(existing)}" if existing
             else "no template there" if folder.is_dir() else "no such folder")
    errors = []
    for (action_name, template), position in uses.items():
        if not template:
            errors.append(f"{position}: action {action_name!r} goes via email but names no "
                          "template (template: NAME)")
        elif not (folder / f"{template}.txt").is_file():
            errors.append(f"{position}: action {action_name!r}: no template {template!r}"
                          f"{suggest(str(template), existing)}: "
                          f"{folder / f'{template}.txt'} does not exist; {there}")
    return errors


def _field_warnings(rules: Any, where: Any, events_path: Path) -> list[str]:
    """The event fields the rules read that no event of the file carries: a misspelt
    field (event.dealy_days) never matches, and says nothing."""
    from .models import Event
    from .rules.expressions import suggest

    _check_text_file(events_path)
    carried: set[str] = set()
    usable = 0
    for item in _incoming(str(events_path), None, None, lambda n: None):
        if isinstance(item.raw, Exception):
            continue
        with suppress(EventError):
            carried.update(Event.from_dict(item.raw).props)
            usable += 1
    if not usable:
        return [f"{events_path}: warning: no usable event in this file: nothing to compare "
                "the fields the rules read with"]
    readers: list[tuple[tuple[str, ...], set[str]]] = []
    for rule in rules.rules:
        fields = set(getattr(rule.condition, "event_fields", ()))
        readers.append((("rules", rule.name, "when"), fields))
        if rule.recovery is not None:
            readers.append((("rules", rule.name, "match"), {rule.recovery.match}))
    for reward in rules.recognition:
        if reward.condition is not None:
            readers.append((("recognition", reward.name, "when"),
                            set(getattr(reward.condition, "event_fields", ()))))
        if reward.spent is not None:  # or_spent sums the purchases' amount
            readers.append((("recognition", reward.name, "after"), {"amount"}))
    warnings = []
    for path, fields in readers:
        what = f"{'rule' if path[0] == 'rules' else 'recognition'} {path[1]!r}"
        for field in sorted(fields - carried - set(CORE_FIELDS)):
            warnings.append(f"{where.of(*path)}: warning: {what} reads event.{field}, which "
                            f"no event in {events_path} carries{suggest(field, carried)}; "
                            f"{'it never adds up' if path[-1] == 'after' else 'it never matches'}"
                            " on these events")
    return warnings


def _read_events(handle: TextIO, name: str) -> Iterator[tuple[int, str, Any]]:
    """(line number, raw line, parsed JSON or the reason it is not usable)."""
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        yield number, line, parse_json_line(line)


@cli.command()
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default="rules",
              show_default=True, envvar="RETENTION_RULES", show_envvar=True,
              help="Rule file or folder.")
@click.option("--now", help="Tick up to this time at the end (default: the last event's time).")
@click.option("--dead-letter", type=click.Path(path_type=Path),
              help="Write unusable lines here (JSON Lines, with the reason).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.argument("events", type=click.File("r", encoding="utf-8"))
def run(rules_path: Path, now: str | None, dead_letter: Path | None, as_json: bool,
        events: TextIO) -> None:
    """Process a JSON Lines file of events in memory and print a summary.

    Exit code 0 when every line was used, 2 when some lines were unusable (each
    is reported on standard error as FILE:LINE: reason and kept with
    --dead-letter), 1 when the rules are broken.
    """
    try:
        engine = Engine.from_path(rules_path)
    except RuleFileError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(1)
    end = None
    if now is not None:
        try:
            end = parse_instant(now)
        except TimeFormatError as exc:
            raise click.BadParameter(str(exc), param_hint="--now") from None
    name = getattr(events, "name", "<stdin>")
    counts: Counter[str] = Counter()
    bad: list[dict[str, Any]] = []
    latest = None
    for number, line, raw in _read_events(events, name):
        try:
            if isinstance(raw, Exception):
                raise raw
            outcome = engine.process(raw, source=Path(name).stem)
        except EventError as exc:
            click.echo(f"{name}:{number}: {exc}", err=True)
            bad.append({"file": name, "line": number, "reason": str(exc), "raw": line.rstrip("\n")})
            counts["dead_lettered"] += 1
            continue
        counts["duplicates" if outcome.duplicate else "processed"] += 1
        if latest is None or outcome.event.ts > latest:
            latest = outcome.event.ts
    if dead_letter is not None and bad:
        with dead_letter.open("a", encoding="utf-8") as out:
            for entry in bad:
                out.write(json.dumps(entry) + "\n")
    if end is None and latest is not None:
        end = from_seconds(latest)
    if end is not None:
        engine.tick(end)
    summary = _summary(engine, counts, end)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if bad:
        sys.exit(2)


def _summary(engine: Engine, counts: Counter[str], end: Any) -> dict[str, Any]:
    levels: Counter[str] = Counter()
    for cid in engine.customers():
        opened = engine.capital(cid) is not None
        levels[(engine.level(cid) or "none") if opened else "prospect"] += 1
    decisions: Counter[tuple[str, str]] = Counter()
    for decision in engine.decisions():
        status = decision.status if decision.reason is None or decision.status == "held_out" \
            else f"{decision.status} ({decision.reason})"
        decisions[(decision.action, status)] += 1
    return {
        "events": {"processed": counts["processed"], "duplicates": counts["duplicates"],
                   "dead_lettered": counts["dead_lettered"]},
        "until": end.isoformat() if end is not None else None,
        "customers_by_level": dict(sorted(levels.items())),
        "decisions": [{"action": a, "status": s, "count": n}
                      for (a, s), n in sorted(decisions.items())],
    }


def _print_summary(summary: dict[str, Any]) -> None:
    ev = summary["events"]
    click.echo(f"events: {ev['processed']} processed, {ev['duplicates']} duplicates, "
               f"{ev['dead_lettered']} dead-lettered; state at {summary['until']}")
    click.echo("\ncustomers by level")
    width = max((len(k) for k in summary["customers_by_level"]), default=5)
    for level, count in summary["customers_by_level"].items():
        click.echo(f"  {level:<{width}}  {count:>7}")
    click.echo("\ndecisions by action and status")
    rows = summary["decisions"]
    if not rows:
        click.echo("  (none)")
    a_width = max(len(r["action"]) for r in rows) if rows else 0
    s_width = max(len(r["status"]) for r in rows) if rows else 0
    for row in rows:
        click.echo(f"  {row['action']:<{a_width}}  {row['status']:<{s_width}}  {row['count']:>7}")


# -- the store ------------------------------------------------------------------------



def _db_option(command: Any) -> Any:
    return click.option("--db", "db_path", type=click.Path(path_type=Path),
                        default="retention.db", show_default=True, envvar="RETENTION_DB",
                        show_envvar=True,
                        help="The SQLite database.")(command)


def _rules_option(command: Any) -> Any:
    return click.option("--rules", "rules_path", type=click.Path(path_type=Path),
                        default="rules", show_default=True, envvar="RETENTION_RULES",
                        show_envvar=True,
                        help="Rule file or folder, used when the database has none yet.")(command)


def _open(db_path: Path, rules_path: Path | None = None, *, create: bool = False) -> Any:
    """The stored engine of ``db_path``: it runs the rules version it last used, or
    ``rules_path`` when it has none yet. A rules folder that differs from the
    version in use gets a note, never a silent switch (``retention rules use``)."""
    from .store import StoredEngine, StoreError, rules_differ

    try:
        exists = db_path.exists()
    except OSError as exc:
        raise StoreError(f"{db_path}: cannot be reached: {exc.strerror}") from None
    if not create and not exists:
        raise StoreError(f"{db_path}: no such database (retention init, or retention "
                         "ingest with --rules, creates one)")
    try:
        engine = StoredEngine(db_path, None)
    except StoreError as exc:
        if "no rules yet" not in str(exc) or rules_path is None:
            raise
        if not rules_path.exists():
            raise StoreError(f"{db_path}: no rules yet and no rules at {rules_path} "
                             "(give --rules PATH)") from None
        return StoredEngine(db_path, rules_path)
    if rules_path is not None and rules_path.exists():
        with suppress(RuleFileError):
            if rules_differ(engine, load_rules(rules_path)):
                click.echo(f"note: {rules_path} differs from the rules in use; "
                           f"`retention rules use {rules_path}` switches", err=True)
    return engine


def _has_rules(db_path: Path) -> bool:
    from .store import StoredEngine, StoreError

    try:
        StoredEngine(db_path, None).close()
    except StoreError as exc:
        if "no rules yet" in str(exc):
            return False
        raise
    return True


def _moment_option(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        return parse_instant(value).isoformat()
    except TimeFormatError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None


def _wall_clock() -> str:
    from datetime import UTC, datetime
    return datetime.now(UTC).isoformat(timespec="seconds")


#: The JSON Schema of rule files, written beside them by ``init`` (an editor reads it
#: offline), and the line that points an editor with the YAML language server at it.
SCHEMA_NAME = "schema.json"
SCHEMA_HINT = f"# yaml-language-server: $schema=./{SCHEMA_NAME}\n"


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), default=".")
@click.option("--force", is_flag=True, help="Overwrite an existing rules/retail.yaml.")
def init(directory: Path, force: bool) -> None:
    """Start a project in DIRECTORY: a rules folder with the commented retail rules,
    the JSON Schema editors check them with, their email templates, and an empty
    database (retention.db)."""
    from .store import StoredEngine

    rules_dir = directory / "rules"
    target = rules_dir / "retail.yaml"
    try:
        rules_dir.mkdir(parents=True, exist_ok=True)
        if target.exists() and not force:
            click.echo(f"kept {target} (exists; --force overwrites)")
        else:
            target.write_text(SCHEMA_HINT + examples.RULES.read_text(encoding="utf-8"),
                              encoding="utf-8")
            click.echo(f"wrote {target}")
        schema = rules_dir / SCHEMA_NAME
        if not schema.exists() or force:
            schema.write_bytes((Path(__file__).resolve().parent / "rules" / "schema.json")
                               .read_bytes())
            click.echo(f"wrote {schema}")
        for template in sorted(examples.TEMPLATES.glob("*.txt")):
            written = rules_dir / "templates" / template.name
            if not written.exists() or force:
                written.parent.mkdir(exist_ok=True)
                written.write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
                click.echo(f"wrote {written}")
    except OSError as exc:
        raise RetentionError(f"cannot write in {rules_dir}: {exc.strerror}") from None
    db = directory / "retention.db"
    if db.exists() and _has_rules(db):  # an existing project keeps its rules version
        with _open(db, rules_dir) as engine:
            click.echo(f"kept {db}: {engine.rules.summary()}")
    else:
        with StoredEngine(db, rules_dir) as engine:
            click.echo(f"database {db} ready: {engine.rules.summary()}")
    click.echo(f"next: retention ingest --db {db} EVENTS.jsonl")


def _check_text_file(path: Path) -> None:
    """Refuse, whole, a file that is not text (an image, a database, an archive): its
    lines would only fill the dead-letter table. A bad line inside a text file is
    dead-lettered, as any unusable line."""
    try:
        if not path.exists():
            raise FileNotFoundError
        if path.is_dir():
            raise RetentionError(f"{path}: a folder, not a file of events")
        if not path.is_file():  # a pipe: read once, by the ingest itself
            return
        with path.open("rb") as handle:
            head = handle.read(8192)
    except FileNotFoundError:
        raise RetentionError(f"{path}: no such file") from None
    except OSError as exc:
        raise RetentionError(f"{path}: cannot read: {exc.strerror}") from None
    if b"\0" in head:
        raise RetentionError(f"{path}: not UTF-8 text (a NUL byte at {head.index(0)}); "
                             "not a file of events, nothing ingested")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.end < len(head) - 3 or len(head) < 8192:  # not a character cut at the end
            bad = sum(1 for byte in head if byte >= 0x80)
            if bad * 10 > len(head):
                raise RetentionError(
                    f"{path}: not UTF-8 text (byte 0x{head[exc.start]:02x} at {exc.start}); "
                    "not a file of events, nothing ingested") from None


#: the longest line an input may have
_MAX_LINE = 16 * 2**20


def _decoded(handle: BinaryIO, advance: Any) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text or None if not UTF-8, text to keep) of each line."""
    number = 0
    while True:
        data = handle.readline(_MAX_LINE)
        if not data:
            return
        number += 1
        advance(len(data))
        if len(data) >= _MAX_LINE and not data.endswith(b"\n"):
            while (more := handle.readline(_MAX_LINE)) and not more.endswith(b"\n"):
                advance(len(more))  # the rest of a line too long to keep
            advance(len(more))
            yield number, None, f"a line longer than {_MAX_LINE // 2**20} MiB\0" + \
                data[:200].decode("utf-8", errors="backslashreplace") + "..."
            continue
        try:  # (a byte-order mark, as spreadsheets write, is not part of the first line)
            yield number, data.decode("utf-8-sig" if number == 1 else "utf-8"), ""
        except UnicodeDecodeError as exc:
            kept = data.decode("utf-8", errors="backslashreplace")
            yield number, None, f"not UTF-8 text: byte 0x{data[exc.start]:02x} at column " \
                f"{exc.start + 1}\0{kept}"


def _incoming(path: str, source: str | None, fmt: str | None,
              advance: Any) -> Iterator[Any]:
    """The inputs of one file (``-`` is standard input), parsed lazily, line by line:
    a line that cannot be used (not UTF-8, not JSON, a broken CSV row) becomes a
    dead letter with its reason, and the lines after it are read on."""
    from .store import Incoming

    origin = "stdin" if path == "-" else path
    kind = fmt or ("csv" if path.lower().endswith(".csv") else "jsonl")
    try:
        handle = click.open_file(path, "rb")
    except OSError as exc:
        raise RetentionError(f"{path}: cannot open: {exc.strerror}") from None
    header: list[str] | None = None
    with handle:
        for number, line, problem in _decoded(handle, advance):
            if line is None:
                reason, kept = problem.split("\0", 1)
                yield Incoming(raw=LineError(reason), origin=origin, line=number, text=kept,
                               retriable=False)
                continue
            if not line.strip():
                continue
            if kind == "jsonl":
                raw = parse_json_line(line)
            elif header is None:
                header = _csv_cells(line)
                if not isinstance(header, list):
                    raise RetentionError(f"{origin}:{number}: unreadable CSV header: {header}")
                continue
            else:
                raw = _csv_event(header, line)
            if isinstance(raw, dict) and source and not raw.get("source"):
                raw["source"] = source
                if kind == "jsonl":
                    line = json.dumps(raw)  # a dead letter keeps the source it came under
            # a CSV row is kept as the JSON object it made, so a retry reads it again
            text = line if kind == "jsonl" or not isinstance(raw, dict) else json.dumps(raw)
            yield Incoming(raw=raw, origin=origin, line=number, text=text,
                           retriable=kind == "jsonl" or isinstance(raw, dict))


def _csv_cells(line: str) -> list[str] | LineError:
    import csv

    try:
        return next(csv.reader([line]))
    except (csv.Error, StopIteration) as exc:
        return LineError(f"unreadable CSV row: {exc}")


#: a CSV cell read as a number: plain decimal notation, no leading zero (an "007" is text)
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?")
#: a number cell longer than this is refused at once; a shorter one too large for an
#: event is refused with the event, as a JSON Lines number is
_MAX_DIGITS = 100


def _csv_event(header: list[str], line: str) -> dict[str, Any] | LineError:
    """A CSV row as an event: empty cells are absent; a property cell in plain decimal
    notation is a number; the event's own fields (id, customer, type, at, source)
    stay text."""
    cells = _csv_cells(line)
    if not isinstance(cells, list):
        return cells
    if len(cells) != len(header):
        return LineError(f"{len(cells)} cells for {len(header)} columns")
    event: dict[str, Any] = {}
    for name, cell in zip(header, cells, strict=True):
        if cell == "":
            continue
        if name not in CORE_FIELDS and _NUMBER.fullmatch(cell):
            if len(cell) > _MAX_DIGITS:  # (Python reads no more than 4300 digits)
                return LineError(f"column {name!r}: a number of {len(cell.lstrip('-'))}"
                                 f" digits is too large to count with (an event's numbers"
                                 f" are at most {MAX_NUMBER:,} in magnitude)")
            event[name] = float(cell) if "." in cell else int(cell)
        else:
            event[name] = cell
    return event


@cli.command()
@_db_option
@_rules_option
@click.option("--source", help="Source of events that name none (default: none).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]),
              help="Input format (default: by extension; JSON Lines for standard input).")
@click.option("--batch", "batch_size", type=click.IntRange(1), default=50_000, show_default=True,
              help="Events per transaction.")
@click.argument("files", nargs=-1, required=True)
def ingest(db_path: Path, rules_path: Path, source: str | None, fmt: str | None,
           batch_size: int, files: tuple[str, ...]) -> None:
    """Ingest events from FILES (JSON Lines or CSV with a header; - for standard input).

    Each batch is one transaction: it lands whole with its decisions, or not at
    all, so an interrupted ingest is simply run again. Exit 0 when every line
    was used, 2 when some were dead-lettered (see `retention dead-letters`).
    """
    from .store import IngestReport

    for path in files:  # before anything is created
        if path != "-":
            _check_text_file(Path(path))
    engine = _open(db_path, rules_path, create=True)
    engine.batch_size = batch_size
    total = IngestReport()
    with engine:
        for path in files:
            size = None if path == "-" else Path(path).stat().st_size \
                if Path(path).is_file() else None
            show = sys.stderr.isatty() and size is not None
            with click.progressbar(length=size or 0, label=path, file=sys.stderr,
                                   hidden=not show) as bar:
                report = engine.ingest(_incoming(path, source, fmt, bar.update))
            total.add(report)
    for problem in total.problems[:20]:
        click.echo(problem, err=True)
    if total.dead_lettered > 20:
        click.echo(f"... and {total.dead_lettered - 20} more (retention dead-letters)",
                   err=True)
    click.echo(f"ingested {total.ingested}, duplicates {total.duplicates}, "
               f"dead-lettered {total.dead_lettered}, decisions {total.decisions}"
               + (f", identities linked {total.identified}" if total.identified else ""))
    if total.dead_lettered:
        sys.exit(2)


def _count(n: int, plural: str) -> str:
    """``1 event``, ``2 events``, ``1 alias`` (plural given, with underscores for
    spaces)."""
    word = plural.replace("_", " ")
    if n == 1:
        word = word[:-3] + "y" if word.endswith("ies") else \
            word[:-2] if word.endswith("ses") else word[:-1]
    return f"{n} {word}"


def _decision_rows(decisions: Iterable[Any]) -> list[dict[str, Any]]:
    return [{"at": d.at.isoformat(), "customer": d.customer, "rule": d.rule,
             "action": d.action, "kind": d.kind, "status": d.status, "reason": d.reason,
             "params": dict(d.params), "id": d.id} for d in decisions]


_DECISION_COLUMNS = ("id", "at", "customer", "rule", "action", "status", "reason", "params")
_DECISION_ALL = ("id", "at", "customer", "rule", "action", "kind", "status", "reason", "params")


def _decision_columns(fmt: str | None) -> tuple[str, ...]:
    """The table shows what a reader needs; machine formats carry every field."""
    return _DECISION_COLUMNS if fmt is None else _DECISION_ALL


@cli.command()
@_db_option
@_rules_option
@click.option("--now", help="Apply time up to T (ISO-8601 with a zone; default: the clock).")
@format_options
def tick(db_path: Path, rules_path: Path, now: str | None, fmt: str | None) -> None:
    """Apply what time did (silence, fading, the licence) and print the decisions."""
    at = _moment_option(now, "--now") or _wall_clock()
    with _open(db_path, rules_path) as engine:
        made = engine.tick(at)
    rows = _decision_rows(made)
    click.echo(render(rows, fmt, columns=_decision_columns(fmt),
                      empty=f"no decision up to {at}"), nl=False)


@cli.command()
@_db_option
@click.argument("customer_id")
@click.option("--at", "at", help="As the customer was at T (default: now).")
@format_options(json="Print the customer as one JSON object, its ledger inside.",
                nl="Print that JSON object on one line.",
                csv="Print the ledger as CSV, with a header line.")
def customer(db_path: Path, customer_id: str, at: str | None, fmt: str | None) -> None:
    """A customer's capital, level, last contact and consent at a moment, and the
    ledger that adds up to that capital: what events did, then what time did since
    that no event has settled yet (silence, fading, licence, the bounds)."""
    moment = _moment_option(at, "--at") or _wall_clock()
    with _open(db_path) as engine:
        info = engine.profile(customer_id, moment)
    canonical, capital = info["customer"], info["capital"]
    if fmt in ("json", "nl"):
        click.echo(json.dumps(info, indent=2 if fmt == "json" else None, default=str))
        return
    rows = [{"at": e["at"], "points": e["points"], "rule": e["rule"],
             "category": e["category"], "settled": "yes" if e["settled"] else "no",
             "reason": e["reason"]} for e in info["ledger"]]
    if fmt == "csv":
        click.echo(render(rows, "csv"), nl=False)
        return
    capital_text = "not open (a prospect)" if capital is None else f"{capital:.2f}"
    click.echo(f"customer  {canonical}"
               + (f" (also {', '.join(info['aliases'])})" if info["aliases"] else ""))
    click.echo(f"capital   {capital_text} at {moment}")
    click.echo(f"level     {info['level'] or 'none'}")
    click.echo(f"contact   last {info['last_contact'] or 'never'}; consent "
               f"{'yes' if info['consent'] else 'withdrawn'}")
    click.echo("")
    click.echo(render(rows, None, empty="(no ledger entry)"), nl=False)
    if rows:
        click.echo(f"in all    {sum(e['points'] for e in info['ledger']):.2f}")


@cli.command("at-risk")
@_db_option
@click.option("--level", help="Capital below this level's threshold (default: below any "
              "level's).")
@click.option("--limit", type=click.IntRange(1), help="At most N customers.")
@click.option("--at", "at", help="Capital and level at T (default: now).")
@format_options
def at_risk(db_path: Path, level: str | None, limit: int | None, at: str | None,
            fmt: str | None) -> None:
    """Customers whose capital at a moment is below a level, lowest capital first,
    with the level they are in then (as `retention customer ID --at T` shows them)."""
    moment = _moment_option(at, "--at") or _wall_clock()
    with _open(db_path) as engine:
        rows = engine.at_risk(level, now=moment, limit=limit)
    click.echo(render(rows, fmt, empty=f"no customer at risk at {moment}", columns=(
        "customer", "level", "capital", "last_event_at", "last_contact_at")), nl=False)


@cli.command()
@_db_option
@click.argument("customer_id", required=False)
@click.option("--distribution", is_flag=True,
              help="The capital of every customer at T, a histogram by level.")
@click.option("--at", "at", help="Up to T / at T (default: now).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="The chart's file, .png or .svg (default: capital.png, or "
                   "distribution.png).")
@click.option("--json", "as_json", is_flag=True,
              help="Print what the chart draws as JSON instead of drawing it.")
def plot(db_path: Path, customer_id: str | None, distribution: bool, at: str | None,
         output: Path | None, as_json: bool) -> None:
    """Draw a customer's capital over time: each ledger entry marked (incidents,
    pull-away forces, retention forces in their colours), the decisions with their
    status, the levels as lines. With --distribution, the capital histogram by level.
    Needs matplotlib (pip install 'retention-engine[plot]')."""
    from . import charts

    if distribution == (customer_id is not None):
        raise click.UsageError("give a CUSTOMER or --distribution (one of them)")
    moment = _moment_option(at, "--at") or _wall_clock()
    target = output or Path("distribution.png" if distribution else "capital.png")
    fmt = charts.format_of(str(target))
    if not as_json:
        charts.require()  # before the work: a missing extra is one line, at once
    with _open(db_path) as engine:
        if distribution:
            data: Any = charts.distribution(engine, moment)
            fig = None if as_json else charts.draw_distribution(data)
        else:
            data = charts.trajectory(engine, customer_id, moment)
            fig = None if as_json else charts.draw_trajectory(data)
    if as_json:
        click.echo(json.dumps(charts.as_dict(data), indent=2))
        return
    try:
        target.write_bytes(charts.render(fig, fmt))
    except OSError as exc:
        raise RetentionError(f"{target}: cannot be written: {exc.strerror}") from None
    click.echo(f"wrote {target}", err=True)


@cli.command()
@_db_option
@click.option("--status", type=click.Choice(
    ["pending", "sending", "sent", "failed", "suppressed", "held_out", "expired"]),
    help="Only decisions with this status.")
@click.option("--since", help="Decided at or after T.")
@click.option("--customer", "customer_id", help="Of one customer.")
@click.option("--limit", type=click.IntRange(1), help="At most N decisions.")
@format_options
def decisions(db_path: Path, status: str | None, since: str | None, customer_id: str | None,
              limit: int | None, fmt: str | None) -> None:
    """The decision outbox, oldest first."""
    moment = _moment_option(since, "--since")
    with _open(db_path) as engine:
        rows = _decision_rows(engine.decisions(customer_id, status=status, since=moment,
                                               limit=limit))
    click.echo(render(rows, fmt, columns=_decision_columns(fmt),
                      empty="no decision"), nl=False)


@cli.command()
@_db_option
@format_options(json="Print the report as one JSON object.",
                nl="Print that JSON object on one line.",
                csv="Print section,name,value rows as CSV, with a header line.")
def stats(db_path: Path, fmt: str | None) -> None:
    """Customers by level, capital distribution, decisions, forces by category."""
    with _open(db_path) as engine:
        report = engine.stats()
    if fmt == "json" or fmt == "nl":
        click.echo(json.dumps(report, indent=2 if fmt == "json" else None))
        return
    if fmt == "csv":
        rows = [{"section": "customers_by_level", "name": k, "value": v}
                for k, v in report["customers_by_level"].items()]
        rows += [{"section": "capital", "name": k, "value": v}
                 for k, v in report["capital"].items()]
        rows += [{"section": "decisions", "name": f"{d['action']}/{d['status']}",
                  "value": d["count"]} for d in report["decisions"]]
        rows += [{"section": "forces", "name": f["category"], "value": f["added"] + f["taken"]}
                 for f in report["forces"]]
        click.echo(render(rows, "csv"), nl=False)
        return
    click.echo(f"{_count(report['events'], 'events')}, "
               f"{_count(report['dead_letters'], 'dead_letters')}, "
               f"{_count(report['forgotten_customers'], 'customers')} forgotten\n")
    click.echo("customers by level (as of their latest event or tick: retention at-risk for now)")
    click.echo(render([{"level": k, "customers": v}
                       for k, v in report["customers_by_level"].items()], None))
    click.echo("capital at each customer's latest event")
    click.echo(render([{k: v for k, v in report["capital"].items()}], None))
    click.echo("decisions by action and status")
    click.echo(render(report["decisions"], None))
    click.echo("forces by category (points added, points taken)")
    click.echo(render(report["forces"], None), nl=False)


@cli.command("dead-letters")
@_db_option
@_rules_option
@click.option("--retry", is_flag=True, help="Ingest them again (after a fix).")
@click.option("--set", "settings", multiple=True, metavar="SOURCE.KEY=VALUE",
              help="An event source setting for --retry (else RETENTION_SOURCE_KEY): a "
                   "hook's body its source could not use yet goes back to that source.")
@click.option("--limit", type=click.IntRange(1), help="List at most N.")
@format_options
def dead_letters(db_path: Path, rules_path: Path, retry: bool, settings: tuple[str, ...],
                 limit: int | None, fmt: str | None) -> None:
    """Input that could not be used, with the reason; --retry ingests it again.

    A webhook body its event source could not use yet (a lookup on the host's API
    failed) is handed back to that source, with the settings it takes in serve."""
    with _open(db_path, rules_path if retry else None) as engine:
        if retry:
            report = engine.retry_dead_letters(resend=_resender(settings))
            click.echo(f"ingested {report.ingested}, duplicates {report.duplicates}, "
                       f"still dead-lettered {report.dead_lettered}, "
                       f"decisions {report.decisions}")
            if report.dead_lettered:
                sys.exit(2)
            return
        rows = engine.dead_letters(limit)
    click.echo(render(rows, fmt, empty="no dead letter", columns=(
        "seq", "origin", "line", "reason", "raw", "retriable", "received_at")), nl=False)


def _resender(settings: tuple[str, ...]) -> Any:
    """``resend(name, text)``: the events the event source ``name`` makes of a body,
    each source built once with ``settings`` (a source missing a setting, or no longer
    installed, raises: its letters stay)."""
    from . import plugins
    from .delivery import Settings, parse_settings

    given = Settings(parse_settings(settings))
    built: dict[str, Any] = {}

    def resend(name: str, text: str) -> list[Any]:
        if name not in built:
            factory = plugins.sources().get(name)
            if factory is None:
                raise RetentionError(f"no event source named {name!r} is loaded "
                                     "(retention plugins)")
            built[name] = factory(given)
        return built[name].parse(text.encode("utf-8"), {})

    return resend


@cli.command()
@_db_option
@click.argument("customer_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def forget(db_path: Path, customer_id: str, yes: bool) -> None:
    """Erase everything held about a customer (counts stay, anonymous).

    Exit 0 when the customer is erased and the file scrubbed (vacuumed), 2 when
    the erasure is committed but the scrub could not finish (a full disk, another
    process holding the database open): the message says how to finish it.
    """
    from .store import ScrubPending

    with _open(db_path) as engine:
        names = engine.identifiers(customer_id)
        if not yes and sys.stdin.isatty():
            click.confirm(f"erase {', '.join(names)} for good?", abort=True)
        held = engine.export(names[0])
        try:
            if not _holds(held):
                if not engine.scrub_pending():
                    raise RetentionError(f"unknown customer {customer_id!r}: nothing erased")
                # an earlier forget could not finish its scrub: this one does
                engine.scrub("the earlier erasure is committed, but",
                             again=f"retention forget {customer_id}")
                click.echo(f"nothing held about {customer_id}; the scrub an earlier erasure "
                           "left pending is done: database vacuumed")
                return
            erased = engine.forget(customer_id)
        except ScrubPending as exc:
            if exc.erased:
                click.echo(f"erased {_erased(exc.erased)} of {names[0]}; "
                           "database not vacuumed yet")
            click.echo(f"warning: {exc}", err=True)
            sys.exit(2)
    click.echo(f"erased {_erased(erased)} of {names[0]}; database vacuumed")


def _erased(erased: dict[str, int]) -> str:
    return ", ".join(_count(n, k) for k, n in erased.items())


@cli.command()
@_db_option
@click.argument("customer_id")
@click.option("-o", "--output", type=click.File("w", encoding="utf-8"), default="-",
              help="Write to FILE (default: standard output).")
def export(db_path: Path, customer_id: str, output: TextIO) -> None:
    """Everything held about a customer, as JSON."""
    with _open(db_path) as engine:
        data = engine.export(customer_id)
    if not _holds(data):
        raise RetentionError(f"unknown customer {customer_id!r}")
    output.write(json.dumps(data, indent=2, default=str) + "\n")


def _holds(export: dict[str, Any]) -> bool:
    """Whether an export has anything about its customer."""
    return bool(export["state"] is not None or export["events"] or export["dead_letters"]
                or export["aliases"])


@cli.group()
def rules() -> None:
    """Rule-file versions of a database."""


@rules.command("use")
@_db_option
@click.argument("path", type=click.Path(path_type=Path))
def rules_use(db_path: Path, path: Path) -> None:
    """Validate PATH and make it the rules of the database (every customer is
    recomputed). A broken PATH changes nothing."""
    from .store import StoredEngine

    new = load_rules(path)  # a broken file stops here: nothing changes
    if db_path.exists() and _has_rules(db_path):
        with _open(db_path) as engine:
            changed = engine.use_rules(new)
    else:
        with StoredEngine(db_path, new):
            changed = True
    click.echo(f"{'now using' if changed else 'already using'} {path}: {new.summary()}")


@rules.command("list")
@_db_option
@format_options
def rules_list(db_path: Path, fmt: str | None) -> None:
    """Every rules version the database used, the active one marked."""
    with _open(db_path) as engine:
        rows = engine.rule_versions()
    click.echo(render(rows, fmt, empty="no rules version",
                      columns=("hash", "files", "used_from", "active")), nl=False)


@cli.command()
@click.option("--db", "db_path", type=click.Path(path_type=Path),
              default="retention-demo.db", show_default=True, help="Demo database (recreated).")
def demo(db_path: Path) -> None:
    """The main job on the embedded default: the bundled retail rules and example
    events into a fresh SQLite database, time applied to the end of the period,
    and the story."""
    from .store import StoredEngine

    if db_path.exists() and not _is_demo(db_path):
        raise RetentionError(f"{db_path} exists and is not a demo database: give another "
                             "--db (the demo recreates its database)")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    events = examples.EVENTS
    with StoredEngine(db_path, examples.RULES) as engine:
        with engine.db.conn:
            engine.db.execute("INSERT INTO meta (key, value) VALUES ('demo', 1)")
        show = sys.stderr.isatty()
        with click.progressbar(length=events.stat().st_size, label="ingesting",
                               file=sys.stderr, hidden=not show) as bar:
            report = engine.ingest(_incoming(str(events), None, None, bar.update))
        end = engine.db.execute("SELECT max(ts) FROM events").fetchone()[0]
        made = engine.tick(from_seconds(end)) if end is not None else []
        _story(engine, report, from_seconds(end) if end else None, len(made), db_path)


def _is_demo(db_path: Path) -> bool:
    """Whether a file is a database ``retention demo`` made (it may recreate it)."""
    try:
        with closing(sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro",
                                     uri=True)) as conn:
            return conn.execute("SELECT value FROM meta WHERE key = 'demo'").fetchone() \
                is not None
    except sqlite3.Error:
        return False


def _story(engine: Any, report: Any, end: Any, ticked: int, db_path: Path) -> None:
    stats = engine.stats()
    customers = sum(stats["customers_by_level"].values())
    click.echo(f"{report.ingested} events of {customers} customers ingested into {db_path} "
               f"({report.decisions} decisions on the way); time applied up to "
               f"{end.date() if end else '-'}: {ticked} more decisions.\n")
    click.echo("customers by level: " + ", ".join(
        f"{k} {v}" for k, v in stats["customers_by_level"].items()))
    moment = end.isoformat() if end else None
    risky = engine.at_risk(now=end, limit=5) if end else []
    click.echo(f"\nmost at risk on {end.date() if end else '-'}, and why")
    for row in risky:
        ledger = engine.explain(row["customer"], at=end)
        worst = sorted((e for e in ledger if e.points < 0), key=lambda e: e.points)[:2]
        why = "; ".join(f"{e.reason} ({e.points:+.1f})" for e in worst)
        click.echo(f"  {row['customer']}  capital {row['capital']:.1f}  {row['level']}: {why}")
    rewards = [d for d in engine.decisions() if d.kind == "in_purchase"
               or d.rule in {r.name for r in engine.rules.recognition}]
    granted: Counter[str] = Counter(d.action for d in rewards if d.status == "pending")
    click.echo("\nrecognition rewards granted: " + (", ".join(
        f"{a} {n}" for a, n in sorted(granted.items())) or "none"))
    suppressed = engine.decisions(status="suppressed")
    by_reason: Counter[tuple[str, str]] = Counter((d.action, d.reason) for d in suppressed)
    click.echo("suppressed: " + (", ".join(
        f"{a} {n} ({r})" for (a, r), n in sorted(by_reason.items())) or "none"))
    held = len(engine.decisions(status="held_out"))
    click.echo(f"held out (control group): {held}")
    if risky:
        # the demo's period ended in the past: its story is told at that moment
        click.echo(f"\nexplore (at the end of the demo period):\n"
                   f"  retention customer --db {db_path} {risky[0]['customer']} --at {moment}\n"
                   f"  retention at-risk --db {db_path} --level rupture --at {moment}")


@cli.command("plugins")
@format_options
def plugins_command(fmt: str | None) -> None:
    """The plugins loaded (built-in and installed), what they provide, and those that
    failed to load."""
    from . import plugins

    rows = plugins.listing()
    click.echo(render(rows, fmt, columns=("name", "origin", "status", "provides")
                      if fmt is None else None), nl=False)


def _templates(rules_path: Path) -> Path:
    """The message templates: ``templates/`` in the rules folder (or beside a file)."""
    return (rules_path if rules_path.is_dir() else rules_path.parent) / "templates"


def _pairs(values: Iterable[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, target = value.partition("=")
        if not sep or not key.strip() or not target.strip():
            raise click.BadParameter(f"{value!r}: write NAME=SINK", param_hint=option)
        pairs[key.strip()] = target.strip()
    return pairs


def _deliverer(engine: Any, rules_path: Path, settings: tuple[str, ...],
               routes: tuple[str, ...], max_attempts: int, backoff: float,
               max_age: float, as_of: float | None) -> Any:
    from . import plugins
    from .delivery import Deliverer, Settings, parse_settings

    return Deliverer(engine, plugins.sinks(), settings=Settings(parse_settings(settings)),
                     routes=_pairs(routes, "--route"), templates=_templates(rules_path),
                     max_attempts=max_attempts, base_backoff=backoff, max_age=max_age,
                     as_of=as_of)


def _duration_option(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except TimeFormatError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds <= 0:
        raise click.BadParameter("must be longer than zero")
    return seconds


def delivery_options(command: Any) -> Any:
    """The options of the delivery loop, shared by ``deliver`` and ``serve``."""
    for option in reversed((
            click.option("--set", "settings", multiple=True, metavar="SINK.KEY=VALUE",
                         help="A sink setting (else RETENTION_SINK_KEY), like "
                              "email.host=localhost."),
            click.option("--route", "routes", multiple=True, metavar="VIA=SINK",
                         help="Deliver the decisions of one 'via' through another sink, "
                              "like crm_task=webhook."),
            click.option("--max-attempts", type=click.IntRange(1), default=8,
                         show_default=True, help="Tries before a decision stays failed."),
            click.option("--backoff", type=click.FloatRange(0), default=30.0,
                         show_default=True,
                         help="Seconds before the first retry; doubled at each one."),
            click.option("--max-age", default="7d", show_default=True,
                         callback=_duration_option, metavar="DURATION",
                         help="A decision older than this when delivery reaches it "
                              "expires, never sent (an action's max_age in the rules "
                              "wins).")),):
        command = option(command)
    return command


@cli.command()
@_db_option
@_rules_option
@delivery_options
@click.option("--retry", "retry_ids", multiple=True, metavar="ID",
              help="Deliver this decision now (a failed one after a fix); repeatable.")
@click.option("--limit", type=click.IntRange(1), help="Deliver at most N decisions.")
@click.option("--now", metavar="T", help="Measure the age of decisions (--max-age) at T "
                                         "instead of the clock: what a run on that day "
                                         "would send.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def deliver(db_path: Path, rules_path: Path, settings: tuple[str, ...],
            routes: tuple[str, ...], max_attempts: int, backoff: float, max_age: float,
            retry_ids: tuple[str, ...], limit: int | None, now: str | None,
            as_json: bool) -> None:
    """Hand pending decisions to the sinks their actions name (via), at least once,
    the decision id as idempotency key; retry failed ones after their backoff. A run
    tries each decision at most once; one older than --max-age expires, never sent.

    Exit 0 when nothing failed, 2 when some deliveries failed (see
    `retention decisions --status failed`), 1 when a sink cannot work (a setting
    missing or refused: its decisions wait, the other sinks deliver)."""
    from .delivery import DeliveryReport

    moment = _moment_option(now, "--now")
    as_of = None if moment is None else parse_instant(moment).timestamp()
    with _open(db_path) as engine:
        deliverer = _deliverer(engine, rules_path, settings, routes, max_attempts, backoff,
                               max_age, as_of)
        try:
            if retry_ids:
                report = DeliveryReport()
                for did in retry_ids:
                    _add_report(report, deliverer.retry(did))
            else:
                report = deliverer.run(limit=limit)
        finally:
            deliverer.close()
    summary = {"sent": report.sent, "failed": report.failed, "gave_up": report.gave_up,
               "expired": report.expired, "waiting_for_a_sink": dict(report.waiting),
               "unavailable": report.unavailable, "paused": report.paused,
               "errors": report.errors}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _echo_failures(report.failures)
        for reason in report.unavailable.values():
            click.echo(f"error: {reason}", err=True)
        line = f"sent {report.sent}, failed {report.failed}"
        if report.gave_up:
            line += f" ({report.gave_up} left for an operator: --retry ID)"
        if report.expired:
            line += (f", expired {report.expired} (older than their max_age: "
                     "retention decisions --status expired)")
        click.echo(line)
        for reason in report.paused.values():
            click.echo(f"paused: {reason}")
        for name in sorted(report.unavailable):
            click.echo(f"not delivered: sink {name!r} cannot work (see the error above); "
                       "its decisions wait")
        for via, n in sorted(report.waiting.items()):
            click.echo(f"waiting: {_count(n, 'decisions')} for sink {via!r}, which no plugin "
                       f"provides (retention plugins; or --route {via}=SINK)")
    if report.unavailable:
        sys.exit(1)
    if report.failed:
        sys.exit(2)


#: kinds of delivery error `retention deliver` prints one line each for; the others
#: are counted in one more line
SHOWN_FAILURES = 10


def _echo_failures(failures: dict[str, list[Any]]) -> None:
    """One line on standard error per kind of failure, most frequent first: a sink
    that is down fails every decision the same way, and says so once."""
    kinds = sorted(failures.items(), key=lambda item: -item[1][0])
    for message, (count, first) in kinds[:SHOWN_FAILURES]:
        which = f"decision {first}" if count == 1 else f"{count} decisions, first {first}"
        click.echo(f"failed: {message} ({which})", err=True)
    rest = kinds[SHOWN_FAILURES:]
    if rest:
        click.echo(f"failed: {sum(n for _, (n, _) in rest)} more decisions, "
                   f"{len(rest)} other kinds of error: retention decisions --status failed",
                   err=True)


def _add_report(total: Any, one: Any) -> None:
    total.sent += one.sent
    total.failed += one.failed
    total.gave_up += one.gave_up
    total.expired += one.expired
    total.errors.extend(one.errors)
    for message, (count, first) in one.failures.items():
        total.failures.setdefault(message, [0, first])[0] += count


@cli.command()
@_db_option
@_rules_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--token", envvar="RETENTION_TOKEN", show_envvar=True,
              help="Bearer token every endpoint but /health requires (RETENTION_TOKEN).")
@click.option("--secret", envvar="RETENTION_STANDARD_SECRET", show_envvar=True,
              help="Standard Webhooks secret that signs POST /events "
                   "(RETENTION_STANDARD_SECRET); unsigned events are refused when set.")
@click.option("--max-body", type=click.IntRange(1), default=1 << 20, show_default=True,
              help="Largest body accepted, in bytes (413 above).")
@click.option("--deliver-every", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Seconds between delivery runs (0: no delivery in this process).")
@click.option("--header-timeout", type=click.FloatRange(0, min_open=True), default=10.0,
              show_default=True, help="Seconds a request's headers may take to arrive, "
                                      "from the connection's opening (408 and closed after).")
@click.option("--body-timeout", type=click.FloatRange(0, min_open=True), default=30.0,
              show_default=True, help="Seconds a request's body may take to arrive, "
                                      "after its headers (408 and closed after).")
@click.option("--keep-alive", type=click.FloatRange(0, min_open=True), default=5.0,
              show_default=True, help="Seconds an idle connection stays open after a "
                                      "response.")
@click.option("--max-header", type=click.IntRange(1024), default=64 * 1024,
              show_default=True, help="Largest request headers accepted, in bytes "
                                      "(431 and closed above).")
@click.option("--quiet", "-q", is_flag=True, help="No access line per request.")
@delivery_options
def serve(db_path: Path, rules_path: Path, host: str, port: int, token: str | None,
          secret: str | None, max_body: int, deliver_every: float, header_timeout: float,
          body_timeout: float, keep_alive: float, max_header: int, quiet: bool,
          settings: tuple[str, ...], routes: tuple[str, ...], max_attempts: int,
          backoff: float, max_age: float) -> None:
    """Serve the webhook API (POST /events, POST /hooks/{source}, GET /customers/{id},
    GET /health) and deliver decisions in the background.

    Says where it listens on standard error, then prints one access line per
    request on standard output (none with --quiet); warnings and delivery errors go
    to standard error."""
    from .delivery import Settings, parse_settings
    from .listener import run
    from .server import ServerConfig, create_app

    values = parse_settings(settings)
    if secret:
        values.setdefault("standard.secret", secret)
    _open(db_path, rules_path, create=True).close()  # created, migrated, rules checked
    config = ServerConfig(db=db_path, token=token, settings=Settings(values),
                          max_body=max_body, deliver_every=deliver_every,
                          routes=_pairs(routes, "--route"), templates=_templates(rules_path),
                          max_attempts=max_attempts, backoff=backoff, max_age=max_age,
                          body_timeout=body_timeout)
    if not values.get("standard.secret"):
        click.echo("warning: no --secret: POST /events accepts unsigned events", err=True)
    run(create_app(config), host=host, port=port, header_timeout=header_timeout,
        body_timeout=body_timeout, keep_alive=keep_alive, max_header=max_header,
        access_log=not quiet,
        announce=lambda line: click.echo(f"retention: {line}", err=True))


def _add_plugin_commands() -> None:
    from . import plugins

    plugins.add_commands(cli)


_add_plugin_commands()


def main() -> None:  # pragma: no cover - the console script
    cli()


if __name__ == "__main__":  # pragma: no cover - python -m retention.cli
    cli()
