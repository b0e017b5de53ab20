"""Events in HTTP bodies: canonical events (one JSON object or an array) and
CloudEvents 1.0 in the structured, batched and binary modes of its HTTP binding.

A CloudEvent becomes a canonical event: its ``data`` (an object) gives the
properties; ``id`` and ``source`` the identity (the pair CloudEvents makes unique,
as the event log does); ``type`` the event type; ``time`` the ``at``; ``subject``
the customer, unless ``data`` names one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs

from .errors import RetentionError

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
#: the CloudEvents attributes that map to the canonical event's fields
_ATTRIBUTES = ("id", "source", "type", "time", "subject", "specversion", "datacontenttype",
               "dataschema")


class BodyError(RetentionError):
    """A body that is not JSON, or not events: answered 400, kept as a dead letter."""


class Unavailable(BodyError):
    """What an event source raises for a body that is what its host sends, but that it
    cannot turn into events now: something they need could not be had (a lookup on
    the host's API failed). The body is kept as a dead letter that ``retention
    dead-letters --retry`` hands back to the source's ``parse`` (with no headers: a
    source that raises it reads the body alone), and the host is answered 503, so it
    may send it again too."""


@attrs.frozen
class Ignored:
    """What an event source returns, among its events, for a notification it does not
    map to an event (a topic it does not handle, a platform's ping): counted in the
    answer's ``ignored``, stored nowhere, answered 200 (platforms retry, then disable,
    an endpoint that fails)."""

    reason: str


def media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def loads(body: bytes) -> Any:
    try:
        value = json.loads(body)
        # JSON may spell a lone UTF-16 surrogate (\ud800), which no text can store
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return value
    except UnicodeEncodeError:
        raise BodyError("the JSON holds a lone UTF-16 surrogate (\\ud800 to \\udfff), "
                        "which is not text") from None
    except UnicodeDecodeError:
        raise BodyError("the body is not UTF-8 text") from None
    except ValueError as exc:
        raise BodyError(f"invalid JSON: {exc}") from None
    except RecursionError:  # as models.parse_json_line says it
        raise BodyError("invalid JSON: nested too deeply") from None


def events_of(body: bytes, headers: Mapping[str, str]) -> list[Any]:
    """The raw events of a body (each to be validated by the ingest path).

    ``headers`` have lower-case names. Raises BodyError when the body is not JSON
    or holds something other than events.
    """
    kind = media_type(headers)
    if "ce-specversion" in headers:
        return [_binary(body, headers)]
    value = loads(body)
    if kind == STRUCTURED:
        if not isinstance(value, dict):
            raise BodyError("a structured CloudEvent must be a JSON object")
        return [from_cloudevent(value)]
    if kind == BATCH:
        if not isinstance(value, list):
            raise BodyError("a CloudEvents batch must be a JSON array")
        return [from_cloudevent(v) if isinstance(v, dict) else v for v in value]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise BodyError("the body must be an event (a JSON object) or an array of events")


def from_cloudevent(ce: Mapping[str, Any]) -> dict[str, Any]:
    """A canonical event from a structured CloudEvent (a JSON object)."""
    data = ce.get("data")
    if data is None and "data_base64" in ce:
        raise BodyError("a CloudEvent with binary data (data_base64) carries no event "
                        "properties: send JSON data")
    return _canonical({k: ce[k] for k in _ATTRIBUTES if k in ce}, data)


def _binary(body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    attributes = {name[3:]: _header_value(name, value) for name, value in headers.items()
                  if name.startswith("ce-")}
    kind = media_type(headers)
    data: Any = None
    if body:
        if kind and not (kind == "application/json" or kind.endswith("+json")):
            raise BodyError(f"binary CloudEvent data must be JSON, got {kind}")
        data = loads(body)
    return _canonical(attributes, data)


def _header_value(name: str, value: str) -> str:
    """A ``ce-`` header's attribute value: unquoted if double-quoted, then
    percent-decoded once (the HTTP binding percent-encodes space, ``"``, ``%`` and
    anything beyond printable ASCII); the decoded bytes must be UTF-8."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = re.sub(r"\\(.)", r"\1", value[1:-1])
    try:
        # header values arrive as latin-1 text: back to their bytes, then decoded
        return unquote_to_bytes(value.encode("latin-1")).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise BodyError(f"header {name}: not UTF-8 once percent-decoded") from None


def _canonical(attributes: Mapping[str, Any], data: Any) -> dict[str, Any]:
    if data is not None and not isinstance(data, dict):
        raise BodyError("CloudEvent data must be a JSON object of event properties")
    event: dict[str, Any] = dict(data or {})
    for key in ("id", "type", "source"):
        if key in attributes:
            event[key] = attributes[key]
    if "time" in attributes and "at" not in event:
        event["at"] = attributes["time"]
    if "subject" in attributes and "customer" not in event:
        event["customer"] = attributes["subject"]
    return event
