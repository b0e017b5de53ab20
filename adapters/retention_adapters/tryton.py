"""Tryton: the ``tryton`` sink, registered for the engine (``via: tryton``, or
``--route crm_tag=tryton``).

The sink itself lives in the Tryton module (``trytond.modules.retention.sink``,
the distribution ``trytond-retention``, in ``adapters/trytond_retention/``): it writes
party categories and notes through Tryton's pool. This plugin only makes it known
to the engine, and imports Tryton only when a decision needs the sink: importing
``trytond`` sets the process's time zone to UTC, which no other command of the engine
should see happen.

Settings, outside the Tryton process only (``retention deliver``; the module's cron
needs none): ``tryton.database`` (the Tryton database's name) and ``tryton.config``
(the trytond configuration file). docs/hosts.md, "Tryton".
"""

from __future__ import annotations

from typing import Any

import retention
from retention.delivery import SettingError, Settings


def make_sink(settings: Settings) -> Any:
    try:
        from trytond.modules.retention.sink import TrytonSink
    except ImportError as exc:
        raise SettingError(f"tryton: the Tryton module is not installed "
                           f"(pip install trytond-retention): {exc}") from None
    return TrytonSink(settings)


@retention.hookimpl
def register_sinks(register: Any) -> None:
    register("tryton", make_sink)
