"""Event time: parsing ISO-8601 instants and rule-file durations.

Inside the engine an instant is a float of seconds since the Unix epoch (UTC);
at the API boundary it is a timezone-aware :class:`datetime.datetime`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

DAY = 86400.0
#: durations longer than this are refused: no retention rule needs them
MAX_DURATION = 100 * 365 * DAY

#: The instants the engine reads, events and times given to it (a tick, ``at=``):
#: from EARLIEST up to LATEST, excluded. Rule durations are at most MAX_DURATION, so
#: every time the engine works out from them (an event plus a window, a fade or a
#: licence step) stays centuries inside what a datetime holds (year 9999), and each
#: microsecond of them is exact as a float of seconds (up to 2**53 microseconds
#: after 1970: the year 2255).
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
EARLIEST_TS = EARLIEST.timestamp()
LATEST_TS = LATEST.timestamp()

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY, "w": 7 * DAY}


class TimeFormatError(ValueError):
    """A time or a duration that cannot be read."""


def parse_instant(value: object) -> datetime:
    """Read an ISO-8601 instant with a time zone (a string or an aware datetime)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise TimeFormatError(f"{value!r} is not an ISO-8601 time") from None
    else:
        raise TimeFormatError(f"expected an ISO-8601 time, got {type(value).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise TimeFormatError(f"{value!s} has no time zone (add Z or an offset like +00:00)")
    if not in_range(moment):
        raise TimeFormatError(out_of_range(moment))
    return moment


def in_range(moment: datetime) -> bool:
    """Whether an aware ``moment`` is one the engine reads (EARLIEST <= it < LATEST)."""
    try:
        return EARLIEST_TS <= moment.timestamp() < LATEST_TS
    except (OverflowError, ValueError, OSError):  # past what a datetime holds, in UTC
        return False


def out_of_range(moment: datetime) -> str:
    """Why ``moment`` is refused, for a message."""
    last = LATEST - timedelta(days=1)
    return (f"{moment.isoformat()} is outside the supported time range "
            f"({EARLIEST:%Y-%m-%d} to {last:%Y-%m-%d} UTC)")


def to_seconds(moment: datetime) -> float:
    return moment.timestamp()


def from_seconds(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def parse_duration(value: object) -> float:
    """Read a duration such as ``90d``, ``12h``, ``2w``, ``30m``, ``45s`` into seconds."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, str):
        raise TimeFormatError(f"expected a duration like 90d, 12h or 2w, got {value!r}")
    match = _DURATION.match(value)
    if not match:
        raise TimeFormatError(f"expected a duration like 90d, 12h or 2w, got {value!r}")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not seconds <= MAX_DURATION:
        raise TimeFormatError(f"{value!r} is longer than 100 years")
    return seconds


def format_instant(seconds: float) -> str:
    """A stable ISO-8601 form (UTC, milliseconds), used in decision triggers."""
    moment = from_seconds(seconds)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- instants as plain numbers, for compact storage ------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
_MICROSECOND = timedelta(microseconds=1)
_ZONES: dict[int, timezone] = {0: UTC}


def fixed_offset(moment: datetime) -> int | None:
    """The UTC offset of ``moment`` in whole seconds, when its zone is a plain fixed
    offset (a zone with rules, an offset with microseconds or a named offset give
    None): with its microseconds since the epoch, that is all it takes to rebuild it
    exactly."""
    zone = moment.tzinfo
    if zone is UTC:  # (the common case, answered at once)
        return 0
    offset = moment.utcoffset()
    if type(zone) is not timezone or offset is None or offset.microseconds:
        return None
    seconds = offset // _SECOND
    if zone.tzname(None) != _zone(seconds).tzname(None):
        return None  # timezone(offset, "EST"): its name would be lost
    return seconds


def to_micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (``timestamp()`` is a float: past the
    23rd century it no longer holds every microsecond)."""
    return (moment - _EPOCH) // _MICROSECOND


def _zone(offset: int) -> timezone:
    zone = _ZONES.get(offset)
    if zone is None:
        zone = _ZONES[offset] = timezone(timedelta(seconds=offset))
    return zone


def from_micros(micros: int, offset: int) -> datetime:
    """The instant ``micros`` after the epoch, in the fixed zone ``offset`` seconds east."""
    return (_EPOCH + timedelta(microseconds=micros)).astimezone(_zone(offset))
