"""The on-disk cache of lm-eval's task index: same index as lm-eval's own parse, rebuilt when a file
changes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.evaluator import harness, index_cache


def _tree(root: Path, few: int = 1) -> Path:
    (root / "sub").mkdir(parents=True)
    # lm-eval's own folders include templates that do not end in .yaml; they must count for the fingerprint
    (root / "sub" / "_template_yaml").write_text(f"output_type: multiple_choice\nnum_fewshot: {few}\n")
    (root / "sub" / "a.yaml").write_text("include: _template_yaml\ntask: tiny_a\ntag: tiny_tag\n")
    (root / "b.yaml").write_text("task: tiny_b\noutput_type: loglikelihood\n")
    (root / "g.yaml").write_text("group: tiny_group\ntask: [tiny_a, tiny_b]\n")
    return root


@pytest.fixture
def parses(monkeypatch):
    """Counts lm-eval's own parses (the original TaskIndex.build, also after install())."""
    real = index_cache._parse
    calls: list[list[Path]] = []

    def counting(paths, resolve_includes):
        calls.append([Path(p) for p in paths])
        return real(paths, resolve_includes)

    monkeypatch.setattr(index_cache, "_parse", counting)
    return calls


def test_cached_index_equals_lm_evals_and_is_rebuilt_when_a_file_changes(tmp_path, parses, caplog):
    from lm_eval.tasks._index import Kind

    root, cache = _tree(tmp_path / "tasks"), tmp_path / "cache"
    first = index_cache.load_or_build(root, cache)
    assert len(parses) == 1
    assert set(first) == {"tiny_a", "tiny_b", "tiny_group", "tiny_tag"}
    assert first["tiny_a"].cfg["num_fewshot"] == 1 and first["tiny_group"].kind == Kind.GROUP
    assert first["tiny_tag"].tags == {"tiny_a"}
    assert len(list(cache.glob("*.pkl"))) == 1

    again = index_cache.load_or_build(root, cache)
    assert len(parses) == 1, "an unchanged folder must come from the cache"
    assert again == first and again is not first

    # an included template changes: the including task's config changes with it
    tpl = root / "sub" / "_template_yaml"
    tpl.write_text("output_type: multiple_choice\nnum_fewshot: 5\n")
    changed = index_cache.load_or_build(root, cache)
    assert len(parses) == 2 and changed["tiny_a"].cfg["num_fewshot"] == 5
    assert len(list(cache.glob("*.pkl"))) == 1, "the stale index is removed"

    (root / "b.yaml").unlink()
    assert "tiny_b" not in index_cache.load_or_build(root, cache) and len(parses) == 3

    # a torn cache file is rebuilt, not an error
    (pkl,) = cache.glob("*.pkl")
    pkl.write_bytes(pkl.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger=index_cache.__name__):
        rebuilt = index_cache.load_or_build(root, cache)
    assert len(parses) == 4 and set(rebuilt) == {"tiny_a", "tiny_group", "tiny_tag"}
    assert "unreadable" in caplog.text


def test_an_unwritable_cache_still_gives_the_index(tmp_path, parses):
    root = _tree(tmp_path / "tasks")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    assert set(index_cache.load_or_build(root, blocker / "cache")) == {
        "tiny_a",
        "tiny_b",
        "tiny_group",
        "tiny_tag",
    }
    assert set(index_cache.load_or_build(root, blocker / "cache")) == {
        "tiny_a",
        "tiny_b",
        "tiny_group",
        "tiny_tag",
    }
    assert len(parses) == 2


def test_task_managers_read_lm_evals_folder_from_the_cache_and_parse_the_rest(tmp_path, parses):
    from lm_eval.tasks import manager

    defaults = Path(manager.__file__).parent.resolve()
    extra = _tree(tmp_path / "tasks")
    tms = [harness.task_manager((str(extra),)) for _ in range(2)]
    parsed_defaults = [p for call in parses for p in call if p.resolve() == defaults]
    parsed_extra = [p for call in parses for p in call if p == extra]
    assert len(parsed_defaults) <= 1, "lm-eval's own folder is parsed at most once (cold cache), then read"
    assert len(parsed_extra) == 2, "users' folders are parsed every time"
    for tm in tms:
        # lm-eval's tasks, the shipped suite and the extra folder, merged in lm-eval's order
        assert {"gsm8k", "mmlu", "megastack_capitals", "tiny_a", "tiny_group"} <= set(tm.all_tasks)
        assert len(tm.all_tasks) > 10_000
    assert tms[0].task_index == tms[1].task_index
    assert index_cache.install() is True  # idempotent


class _Planted:
    """A pickle that would run a command when loaded by plain pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_planted_cache_file_never_runs_and_is_rebuilt(tmp_path, parses, caplog):
    import pickle

    root, cache = _tree(tmp_path / "tasks"), tmp_path / "cache"
    index_cache.load_or_build(root, cache)
    (pkl,) = cache.glob("*.pkl")
    marker = tmp_path / "pwned"
    pkl.write_bytes(pickle.dumps({"tiny_a": _Planted(marker)}))
    with caplog.at_level(logging.WARNING, logger=index_cache.__name__):
        index = index_cache.load_or_build(root, cache)
    assert not marker.exists(), "the planted pickle ran"
    assert "posix.system is not a class" in caplog.text or "os.system is not a class" in caplog.text, (
        caplog.text
    )
    assert len(parses) == 2 and set(index) == {"tiny_a", "tiny_b", "tiny_group", "tiny_tag"}
