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


def test_readme_library_examples_run_from_an_installed_wheel(tmp_path):
    """Installed from a wheel, far from the repository, the README's examples run: the
    bundled rules and events come from the package (``retention.examples``)."""
    import subprocess
    import sys
    import zipfile

    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("retention_engine-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "\n".join([
        "import retention",
        f"assert retention.__file__.startswith({str(site)!r}), retention.__file__",
        *python_blocks(ROOT / "README.md")])
    ran = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(site),
                                                      "PATH": "/usr/bin:/bin"})
    assert ran.returncode == 0, ran.stderr
    assert "[('late_delivery', -10.0), ('very_late_delivery', -6.0)]" in ran.stdout
