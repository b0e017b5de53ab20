"""The README's examples run as written, and say what they print."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_quickstart_runs(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    blocks = python_blocks(ROOT / "README.md")
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "[('late_delivery', -10.0), ('very_late_delivery', -6.0)]" in printed


@pytest.mark.parametrize("doc", ["README.md", "docs/rules.md", "docs/concepts.md"])
def test_yaml_snippets_in_docs_are_valid_yaml(doc):
    import yaml

    for block in re.findall(r"```yaml\n(.*?)```", (ROOT / doc).read_text(), flags=re.S):
        yaml.safe_load(block)
