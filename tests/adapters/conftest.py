"""What the adapters' tests share: a real server (uvicorn on loopback, as in
tests/test_server.py) over a database with the bundled retail rules, the platforms'
documented example payloads under tests/fixtures/, and the database read back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the server and database fixtures of the server's tests, shared
from ..test_server import count, db, rows, start  # noqa: F401

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixture(platform: str, name: str) -> bytes:
    """The raw bytes of a platform's example payload, as kept in tests/fixtures/."""
    return (FIXTURES / platform / name).read_bytes()


def fixture_json(platform: str, name: str) -> Any:
    return json.loads(fixture(platform, name))


def stored(path: Path, source: str | None = None) -> list[dict[str, Any]]:
    """The events stored, oldest first, each as the canonical mapping it was (the
    properties merged in)."""
    where, args = ("WHERE source = ?", [source]) if source else ("", [])
    out = []
    for row in rows(path, f"SELECT id, customer, type, at, source, props FROM events {where}"
                        " ORDER BY at, id", *args):
        eid, cust, kind, at, src, props = row
        out.append({"id": eid, "customer": cust, "type": kind, "at": at, "source": src,
                    **(json.loads(props) if props else {})})
    return out


def aliases(path: Path) -> dict[str, str]:
    """alias -> canonical customer."""
    return dict(rows(path, "SELECT alias, customer FROM aliases"))
