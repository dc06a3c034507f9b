"""tools/check_imports.py finds import cycles (lazy imports count, TYPE_CHECKING blocks do not)."""

import sys

import pytest

from shared.paths import REPO_ROOT

pytestmark = pytest.mark.unit
sys.path.insert(0, str(REPO_ROOT / "tools"))
from check_imports import cycles, imports_of, module_graph  # noqa: E402


def test_cycles_are_found_and_chains_are_not():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"f"}, "f": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_lazy_imports_count_and_type_checking_ones_do_not(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from services.x import A\n"
        "def g():\n    from services.y import b\n"
    )
    found = imports_of(f, with_names=True)
    assert "services.y" in found and "services.y.b" in found and "services.x" not in found


def test_the_repository_has_no_cycles_now():
    graph = module_graph()
    assert "services.trainer.datafiles" in graph["services.trainer.spec"]  # edges are there to be checked
    assert cycles(graph) == []


def test_the_docstring_rule_finds_public_functions_without_one(tmp_path, monkeypatch):
    import check_docstrings

    monkeypatch.setattr(check_docstrings, "ROOT", tmp_path)
    f = tmp_path / "m.py"
    f.write_text(
        'def a():\n    """Says."""\n\n\ndef b():\n    pass\n\n\ndef _c():\n    pass\n\n\nclass K:\n    def '
        "d(self):\n        return 1\n"
    )
    assert check_docstrings.undocumented(f) == ["m.py:5 b", "m.py:14 K.d"]
