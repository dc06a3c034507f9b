"""The README's benchmark figures come from docs/benchmarks.md, which `make bench` writes from what each
benchmark printed: every figure in the README's table must be found there, and every benchmark has a
section."""

import re

import pytest

from shared.paths import REPO_ROOT

pytestmark = pytest.mark.unit
DOC = REPO_ROOT / "docs" / "benchmarks.md"
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?=x|%| s\b| ms\b| MB\b| MiB\b|\b)")


def readme_rows() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def figures(row: str) -> list[str]:
    """The measured figures of a README row: decimals (2.99, 1.07x, 0.28 s); whole numbers are left out
    (core counts, dates, sizes of the inputs)."""
    return [n for n in NUMBER.findall(row) if "." in n]


def test_every_benchmark_has_a_section():
    from tools.bench.run_all import SKIP  # helpers, and parts of a benchmark run by it

    names = sorted(p.stem for p in (REPO_ROOT / "tools" / "bench").glob("*.py") if p.name not in SKIP)
    doc = DOC.read_text()
    assert names and all(f"\n## {n}\n" in doc for n in names), names
    assert "FAILED" not in doc


def test_readme_figures_are_in_the_benchmark_doc():
    doc = DOC.read_text()
    rows = readme_rows()
    assert len(rows) >= 5
    missing = [(row.split("|")[1].strip(), f) for row in rows for f in figures(row) if f not in doc]
    assert not missing, f"README figures not in docs/benchmarks.md (run make bench, copy from it): {missing}"


def test_running_some_benchmarks_keeps_the_others_sections(tmp_path, monkeypatch):
    import json

    from tools.bench import run_all

    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    head = {"command": "python tools/bench/b.py", "returncode": 0, "seconds": 3}
    (tmp_path / "b.txt").write_text(json.dumps(head) + "\nb's new table\n")
    previous = "# Benchmarks\n\n## a\n\na's old table\n\n## b\n\nb's old table\n\n## c\n\nc's old table\n"
    doc = run_all.render(previous)
    assert "a's old table" in doc and "c's old table" in doc and "b's new table" in doc
    assert "b's old table" not in doc
    assert [line for line in doc.splitlines() if line.startswith("## ")] == ["## a", "## b", "## c"]
