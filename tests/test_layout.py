"""The house rules a reader relies on: modules of one size, benchmarks that import no other benchmark, no
``sys.path`` edits (issue 29)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_benchmark_imports_another_benchmark():
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_") and p.stem != "harness"}
    assert len(scripts) > 10
    borrowed = {p.name: sorted(_imported(p) & scripts) for p in BENCH.glob("*.py")}
    assert {k: v for k, v in borrowed.items() if v} == {}


def test_nothing_edits_sys_path():
    files = [*BENCH.glob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "moalign").rglob("*.py")]
    edits = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                edits.append(str(f.relative_to(ROOT)))
    assert sorted(set(edits)) == []


def test_no_library_module_over_600_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "moalign").rglob("*.py")}
    assert len(sizes) > 20
    assert {k: n for k, n in sizes.items() if n > 600} == {}
