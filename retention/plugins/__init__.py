"""The plugin manager: built-in plugins and those installed under the entry-point
group ``retention``, registered through the same hooks.

``load()`` runs once when ``retention`` is imported. A third-party plugin that fails
to import is recorded in ``FAILED`` (``retention plugins`` shows it) and skipped.
``RETENTION_LOAD_PLUGINS`` set to a comma-separated list of entry-point names loads
only those third-party plugins (empty: none).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from importlib import metadata
from typing import Any

import attrs
import pluggy

from .. import hookspecs
from ..errors import RetentionError

#: the built-in plugins, in registration order
DEFAULT_PLUGINS = (
    "retention.plugins.functions",
    "retention.plugins.matchers",
    "retention.plugins.log",
    "retention.plugins.email",
    "retention.plugins.webhook",
    "retention.plugins.standard",
)

GROUP = "retention"

pm = pluggy.PluginManager("retention")
pm.add_hookspecs(hookspecs)


class PluginError(RetentionError):
    """A plugin registered something unusable."""


@attrs.frozen
class Failure:
    """A third-party plugin that could not be loaded."""

    name: str
    distribution: str | None
    error: str


@attrs.frozen
class Provided:
    """One thing a plugin registered: a sink, a source, a function, a matcher."""

    kind: str
    name: str
    value: Any
    plugin: str


#: third-party plugins that failed to load, with the error
FAILED: list[Failure] = []
#: plugin name -> where it came from ("built-in" or the distribution and version)
ORIGINS: dict[str, str] = {}
_loaded = False
#: condition functions the plugins put into the expression language
_functions_from_plugins: set[str] = set()


def load() -> pluggy.PluginManager:
    """Register the built-in plugins and the installed ones (once)."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        ORIGINS[module_name] = "built-in"
    _load_entry_points()
    refresh()
    return pm


def _load_entry_points() -> None:
    wanted = os.environ.get("RETENTION_LOAD_PLUGINS")
    allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    for ep in metadata.entry_points(group=GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        dist = ep.dist
        origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
        if pm.get_plugin(ep.name) is not None or ep.name in ORIGINS:
            continue  # the same distribution seen twice on the path
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin is reported, never fatal
            FAILED.append(Failure(name=ep.name, distribution=origin,
                                  error=f"{type(exc).__name__}: {exc}".strip()))
            continue
        ORIGINS[ep.name] = origin


def _collect(hook: str) -> list[Provided]:
    """What the plugins register through ``hook``. Plugins registered later are asked
    first (pluggy's order), so a third-party plugin can replace a built-in of the same
    name; the first registration of a name wins. A plugin whose hook raises, or that
    registers something unusable, is reported in FAILED and none of what it registered
    through this hook is used."""
    kind = hook[len("register_"):-1]
    found: list[Provided] = []
    seen: set[str] = set()
    caller = getattr(pm.hook, hook)
    for impl in reversed(caller.get_hookimpls()):  # the order pluggy calls them in
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        mine: list[Provided] = []

        def register(name: str, value: Any, _plugin: str = plugin_name,
                     _mine: list[Provided] = mine) -> None:
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                raise PluginError(f"registered a {kind} named {name!r}: a name is an "
                                  "identifier not starting with _")
            if not callable(value):
                raise PluginError(f"registered {kind} {name!r} as a {type(value).__name__}, "
                                  "which cannot be called")
            _mine.append(Provided(kind=kind, name=name, value=value, plugin=_plugin))

        try:
            impl.function(**{arg: register for arg in impl.argnames})
        except Exception as exc:  # a broken third-party hook is reported, never fatal
            _failed(plugin_name, f"{hook}: {exc}" if isinstance(exc, PluginError)
                    else f"{hook}: {type(exc).__name__}: {exc}")
            continue
        for provided in mine:
            if provided.name not in seen:
                seen.add(provided.name)
                found.append(provided)
    return found


def _failed(name: str, error: str) -> None:
    failure = Failure(name=name, distribution=ORIGINS.get(name), error=error)
    if failure not in FAILED:
        FAILED.append(failure)


def collect(kind: str) -> dict[str, Provided]:
    """``sink``, ``source``, ``function`` or ``matcher`` name -> what provides it."""
    return {p.name: p for p in _collect(f"register_{kind}s")}


def sinks() -> dict[str, Callable[..., Any]]:
    """Sink name -> factory taking the settings."""
    return {name: p.value for name, p in collect("sink").items()}


def sources() -> dict[str, Callable[..., Any]]:
    """Event-source name -> factory taking the settings."""
    return {name: p.value for name, p in collect("source").items()}


def refresh() -> None:
    """Put the plugins' condition functions and matchers into the rule language (after a
    plugin is registered or unregistered). Rules already loaded keep what they compiled."""
    from ..rules import expressions, matchers

    for name in _functions_from_plugins:
        expressions.FUNCTIONS.pop(name, None)
    _functions_from_plugins.clear()
    for name, provided in collect("function").items():
        expressions.register_function(name, provided.value)
        _functions_from_plugins.add(name)
    matchers.MATCHERS.clear()
    for name, provided in collect("matcher").items():
        matchers.MATCHERS[name] = provided.value


def add_commands(cli: Any) -> None:
    """Let every plugin add its commands to the click group ``cli``; a plugin whose
    hook fails is reported in FAILED and the command line still works."""
    for impl in reversed(pm.hook.register_commands.get_hookimpls()):
        try:
            impl.function(**{arg: cli for arg in impl.argnames})
        except Exception as exc:
            name = pm.get_name(impl.plugin) or repr(impl.plugin)
            _failed(name, f"register_commands: {type(exc).__name__}: {exc}")


def listing() -> list[dict[str, Any]]:
    """One row per loaded or failed plugin: name, origin, hooks and what it provides."""
    provided: dict[str, list[str]] = {}
    for kind in ("sink", "source", "function", "matcher"):
        for p in _collect(f"register_{kind}s"):
            provided.setdefault(p.plugin, []).append(f"{kind} {p.name}")
    rows = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or ())
        rows.append({"name": name, "origin": ORIGINS.get(name, "registered in code"),
                     "hooks": ", ".join(hooks),
                     "provides": ", ".join(provided.get(name, [])),
                     "status": "loaded"})
    for f in FAILED:
        rows.append({"name": f.name, "origin": f.distribution or "", "hooks": "",
                     "provides": "", "status": f"failed: {f.error}"})
    return rows
