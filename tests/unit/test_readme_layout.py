"""The README's layout paragraph names the tree as it is: every pipeline subpackage and module,
and nothing that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\nLayout: ")
    return text[start : text.index("\n\n", start)]


def test_every_pipeline_package_and_module_is_named():
    layout = _layout()
    names = {p.name + "/" for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists()}
    names |= {p.name for p in (ROOT / "pipeline").glob("*.py") if p.name != "__init__.py"}
    missing = sorted(n for n in names if f"`{n}`" not in layout)
    assert not missing, f"README layout does not name {missing}"


def test_every_named_path_exists():
    layout = _layout()
    top = ["pipeline/", "configs/", "jobs/", "tests/", "bench/", "docs/", "deploy/"]
    for name in top:
        assert f"`{name}`" in layout and (ROOT / name).is_dir(), name
    for name in re.findall(r"`([\w./]+)`", layout):
        candidates = [ROOT / name, ROOT / "pipeline" / name, ROOT / "tests" / name]
        candidates += [ROOT / "pipeline" / "models" / name]
        assert any(c.exists() for c in candidates), f"README layout names {name!r}: not found"
