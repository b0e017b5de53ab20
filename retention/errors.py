"""The project's own errors: every user mistake surfaces as one of these."""

from __future__ import annotations

import attrs


class RetentionError(Exception):
    """Base class of every error the engine raises on purpose."""


class EventError(RetentionError, ValueError):
    """An event that cannot be used; ``field`` names the culprit."""

    def __init__(self, message: str, *, field: str | None = None, event_id: object = None):
        self.field = field
        self.event_id = event_id
        prefix = f"event {event_id!s}: " if event_id not in (None, "") else "event: "
        super().__init__(prefix + message)


class LineError(EventError):
    """A line of input that is not an event at all (not UTF-8, not JSON, a broken CSV
    row): its message names the problem alone."""

    def __init__(self, message: str):
        self.field = None
        self.event_id = None
        ValueError.__init__(self, message)


@attrs.frozen(kw_only=True)
class RuleProblem:
    """One mistake in a rule file, at a position (1-based line and column)."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class RuleFileError(RetentionError):
    """A rule file (or folder) with mistakes; it did not load, not even in part."""

    def __init__(self, problems: list[RuleProblem]):
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.column))
        lines = [str(p) for p in self.problems]
        super().__init__("\n".join(lines) if lines else "invalid rule file")
