"""The Tryton module ``retention``: the retention engine inside Tryton.

Sales, return sales and complaints become the engine's events after Tryton commits
(``event.py``); the party form shows the capital, the level and the ledger, and a list
shows the parties at risk (``party.py``); the engine's decisions come back as party
categories and notes (``sink.py``). The engine runs embedded or remote, as the
``[retention]`` section of trytond.conf says (``engine.py``). docs/hosts.md, "Tryton".

Nothing is imported here: Tryton registers the classes ``tryton.cfg`` names.
"""
