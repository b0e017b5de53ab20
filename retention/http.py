"""HTTP requests of sinks, answered the way the delivery loop understands.

``request`` sends one request with urllib and turns the answer into what a sink
returns or raises: a 2xx answer is returned; 408, 425, 429 and 5xx, or no answer,
raise a ``DeliveryError`` worth retrying (with ``retry_after`` when the server says
how long to wait); any other 4xx is permanent. A redirect is not followed: urllib
would follow a 301/302/303 with a GET without the body, and a 2xx to that GET would
count as delivered, so it is a failure, tried again later.
"""

from __future__ import annotations

import email.utils
import json
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Mapping
from typing import Any

import attrs

from .delivery import DeliveryError

#: 4xx answers worth trying again
RETRIED = frozenset({408, 425, 429})
#: the longest wait a server's Retry-After may ask for (seconds); past it, the
#: delivery loop's own backoff decides
MAX_RETRY_AFTER = 86400.0
#: the most bytes of an answer read (a JSON reply of an API, not a download)
MAX_ANSWER = 1 << 20


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


@attrs.frozen
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON (None when empty); a body that is not JSON is a failure
        worth retrying (a proxy's error page)."""
        if not self.body.strip():
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            raise DeliveryError(f"the answer ({self.status}) is not JSON: "
                                f"{self.body[:80]!r}") from None


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date),
    within [0, MAX_RETRY_AFTER]; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def request(method: str, url: str, *, headers: Mapping[str, str] | None = None,
            body: Any = None, timeout: float = 10.0, accept: Collection[int] = (),
            name: str | None = None) -> Answer:
    """Send one request; ``body`` is bytes, or a value sent as JSON. Statuses in
    ``accept`` are returned like a 2xx (a lookup's 404). ``name`` stands for the URL
    in messages (a URL may carry a key in its query)."""
    data = body
    sent = {"user-agent": "retention-engine", **(headers or {})}
    if body is not None and not isinstance(body, bytes):
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        sent.setdefault("content-type", "application/json")
    where = name or url
    req = urllib.request.Request(url, data=data, headers=sent, method=method)
    try:
        with _opener.open(req, timeout=timeout) as response:
            return Answer(response.status, dict(response.headers.items()),
                          response.read(MAX_ANSWER))
    except urllib.error.HTTPError as exc:
        with exc:
            code, answer_headers = exc.code, dict(exc.headers.items()) if exc.headers else {}
            text = exc.read(MAX_ANSWER) if code in accept else b""
        if code in accept:
            return Answer(code, answer_headers, text)
        if 300 <= code < 400:
            raise DeliveryError(f"{where} answered {code} {exc.reason} (redirects are not "
                                "followed: set the URL to where it points)") from None
        permanent = 400 <= code < 500 and code not in RETRIED
        wait = retry_after(answer_headers.get("Retry-After")) if code in (429, 503) else None
        raise DeliveryError(f"{where} answered {code} {exc.reason}", permanent=permanent,
                            retry_after=wait) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DeliveryError(f"{where}: {reason}") from None
