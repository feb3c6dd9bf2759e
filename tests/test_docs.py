"""The README and docs/ pages: every relative link and anchor resolves, every Python block's lightning_accel
imports and call arguments exist, every YAML block's callbacks take their init_args (docs/check_docs.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _checker():
    spec = importlib.util.spec_from_file_location("check_docs", ROOT / "docs" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_and_docs_pages_check(capsys):
    assert _checker().main(ROOT) == 0, capsys.readouterr().out


def test_the_checker_finds_a_broken_link_and_an_unknown_argument(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "[gone](docs/missing.md)\n\n```python\nfrom lightning_accel import StructuredPruning\n"
        "StructuredPruning(amountt=0.5)\n```\n"
    )
    assert _checker().main(tmp_path) != 0
