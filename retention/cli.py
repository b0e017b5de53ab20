"""The ``retention`` command line."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import click

from .engine import Engine
from .errors import EventError, RuleFileError
from .rules.loader import load_rules
from .times import TimeFormatError, from_seconds, parse_instant


@click.group()
@click.version_option(package_name="retention-engine")
def cli() -> None:
    """retention: tolerance capital, rupture thresholds and recognition rewards."""


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
def check(path: Path) -> None:
    """Validate a rule file or folder: print every mistake as file:line:column, or a summary."""
    try:
        rules = load_rules(path)
    except RuleFileError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        count = len(exc.problems)
        click.echo(f"{count} error{'s' if count != 1 else ''}; nothing was loaded", err=True)
        sys.exit(1)
    click.echo(f"ok: {rules.summary()}")


def _read_events(handle: TextIO, name: str) -> Iterator[tuple[int, str, Any]]:
    """(line number, raw line, parsed JSON or the reason it is not usable)."""
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            yield number, line, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, line, EventError(f"invalid JSON: {exc.msg} at column {exc.colno}")


@cli.command()
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default="rules",
              show_default=True, envvar="RETENTION_RULES", help="Rule file or folder.")
@click.option("--now", help="Tick up to this time at the end (default: the last event's time).")
@click.option("--dead-letter", type=click.Path(path_type=Path),
              help="Write unusable lines here (JSON Lines, with the reason).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
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


def main() -> None:  # pragma: no cover - the console script
    cli()


if __name__ == "__main__":  # pragma: no cover - python -m retention.cli
    cli()
