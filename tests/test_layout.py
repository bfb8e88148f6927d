"""The code's layout as a contract (issue 10): one home per concept, arrows the right way.

A newcomer reads the file list as the data flow; these checks keep it so: no module grows
past about 500 lines, callers read the engine's declared interface instead of probing it,
and the low layers import nothing of the high ones.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dreamgen"
MAX_LINES = 510  # "about 500": room for a docstring, not for a second concept


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_holds_two_concepts_worth_of_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these (one concept per module): {long}"


def test_nothing_probes_the_engine_for_undeclared_attributes() -> None:
    probe = re.compile(r"\b(getattr|hasattr)\((self\.)?engine\b")
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _modules()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if probe.search(line)
    ]
    assert found == []


def test_the_version_comes_from_its_leaf_module() -> None:
    found = [
        str(p.relative_to(ROOT))
        for p in _modules()
        if "from dreamgen import __version__" in p.read_text(encoding="utf-8")
    ]
    assert found == []


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("dreamgen.validate", ["dreamgen.planner"]),
        ("dreamgen.config", ["dreamgen.engines", "dreamgen.planner"]),
        ("dreamgen.training", ["aiohttp", "jinja2", "tenacity", "dreamgen.engines"]),
    ],
)
def test_low_layers_do_not_import_high_ones(module: str, forbidden: list[str]) -> None:
    code = f"import sys, {module}; print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"importing {module} loads {out.stdout.strip()}"
