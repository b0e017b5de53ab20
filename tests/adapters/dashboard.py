"""A retention database for the Datasette plugin's tests, and a reader of the tables
its pages show."""

from html.parser import HTMLParser

from retention.store import StoredEngine
from tests.test_charts import END, EVENTS, RULES

ALIAS = "email:alice@example.com"
__all__ = ["ALIAS", "END", "build", "tables"]


def build(folder):
    """The charts' story (alice drained to rupture, bob to the floor, dan fresh, carol a
    prospect), alice known by her email too, time applied up to END."""
    rules = folder / "rules.yaml"
    rules.write_text(RULES)
    path = folder / "retention.db"
    with StoredEngine(path, rules) as engine:
        engine.ingest([dict(e, source="test") for e in EVENTS]
                      + [{"type": "identify", "customer": "alice", "aliases": [ALIAS]}])
        engine.tick(END)
    return path


_VOID = {"img", "br", "meta", "link", "input", "hr", "source", "wbr"}


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.texts = {}, {}
        self._table = self._row = self._cell = None
        self._id_stack: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in _VOID:
            return
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        self._id_stack.append(attrs.get("id"))
        if attrs.get("id"):
            self.texts[attrs["id"]] = []

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        if self._id_stack:
            self._id_stack.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        for ident in self._id_stack:
            if ident:
                self.texts[ident].append(data)


def tables(html):
    """{table id: rows of cell texts, header first}, {element id: its text}."""
    parser = _Tables()
    parser.feed(html)
    return parser.tables, {k: " ".join("".join(v).split()) for k, v in parser.texts.items()}
