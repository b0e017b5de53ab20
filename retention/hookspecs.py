"""The hooks a plugin implements, one per extension point.

Every hook is a collection hook: it gets a ``register`` callback (or the click
group) and may call it any number of times. Built-in plugins in
``retention/plugins/`` implement them exactly as third-party ones do; docs/plugins.md
describes each hook with an example, and a test checks that it describes them all.
"""

from __future__ import annotations

from typing import Any

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("retention")
hookimpl = HookimplMarker("retention")


@hookspec
def register_sinks(register: Any) -> None:
    """Add action sinks: call ``register(name, make)`` where ``make(settings)`` returns an
    object whose ``deliver(delivery)`` sends one decision (``delivery.decision``) or raises
    DeliveryError; a rule file's ``via: name`` picks it."""


@hookspec
def register_sources(register: Any) -> None:
    """Add webhook event sources: call ``register(name, make)`` where ``make(settings)``
    returns an object whose ``verify(body, headers)`` checks the signature of the raw
    bytes and ``parse(body, headers)`` turns them into canonical event mappings;
    ``POST /hooks/{name}`` uses it."""


@hookspec
def register_functions(register: Any) -> None:
    """Add functions rule-file conditions may call: ``register(name, function)``."""


@hookspec
def register_matchers(register: Any) -> None:
    """Add condition matchers: ``register(name, compile)`` where ``compile(source)`` turns
    the text of a rule's ``when`` into a Condition; a rule picks one with ``matcher: name``
    (the built-in ``python`` matcher is the default)."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add commands to the ``retention`` command line: ``cli`` is its click group."""
