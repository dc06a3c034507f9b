"""lm-eval's index of its own tasks, kept on disk between processes.

Building lm-eval's ``TaskManager`` parses every task YAML that lm-eval ships (about 14,000 files): 10-20 s on
2 cores. The evaluator pays it at start, for every submission that brings its own include paths, and in the
worker process of every run. The index of lm-eval's own task folder depends only on the files in that folder,
so it is pickled under ``.cache/lm-eval-index/`` (written by this process only, atomically) and loaded in
about a second, through an unpickler that resolves only the classes the index is made of (a planted file is
rebuilt, never run). The key is a fingerprint of the lm-eval version and of the path, size and mtime of every
file in the folder, so an edited, added or removed task file (templates without ``.yaml`` included) builds it
afresh. Other folders (the offline suite, users' include paths) are small and always parsed, exactly as
lm-eval does.

``install()`` puts the cached build in place of lm-eval's ``TaskIndex.build`` for the whole process; the
merge of several folders (later folders override earlier ones) is lm-eval's own order and rule.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path
from typing import Any

from llm.checkpoints.safe_pickle import AllowListUnpickler
from shared.atomic import atomic_file
from shared.paths import CACHE_DIR

logger = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = CACHE_DIR / "lm-eval-index"
SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints"}
# what lm-eval's TaskIndex.build returns is made of: its Entry records, their Kind, paths (and builtins)
INDEX_CLASSES = {
    "lm_eval.tasks._index": frozenset({"Entry", "Kind"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath"}),
}


def fingerprint(root: Path) -> str:
    """A hash of the lm-eval version and of every file's relative path, size and mtime under ``root``."""
    import lm_eval

    h = hashlib.sha256(f"{getattr(lm_eval, '__version__', '?')}\0{root.resolve()}\0".encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def load_or_build(
    root: Path, cache_dir: Path = DEFAULT_CACHE_DIR, *, resolve_includes: bool = True
) -> dict[str, Any]:
    """lm-eval's ``TaskIndex.build([root])``, read from ``cache_dir`` when the folder has not changed."""
    root = Path(root)
    key = fingerprint(root)
    path = Path(cache_dir) / f"{key}-{int(resolve_includes)}.pkl"
    if path.is_file():
        try:
            with path.open(
                "rb"
            ) as f:  # an allow-listed unpickler: a planted file cannot run code, only be rebuilt
                return AllowListUnpickler(f, INDEX_CLASSES, "lm-eval's task index").load()
        except Exception as e:  # a torn, foreign or hostile file: rebuild it
            logger.warning("lm-eval task index cache %s unreadable (%s); rebuilding", path, e)
    index = _parse([root], resolve_includes)
    try:
        with atomic_file(path) as f:
            pickle.dump(index, f, protocol=pickle.HIGHEST_PROTOCOL)
        for old in path.parent.glob(f"*-{int(resolve_includes)}.pkl"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:  # a read-only checkout still evaluates, only slower
        logger.warning("cannot write lm-eval task index cache %s (%s)", path, e)
    return index


def _parse(paths: list[Path], resolve_includes: bool) -> dict[str, Any]:
    """lm-eval's own parse of task folders (its ``TaskIndex.build``, also once ``install()`` stands in for
    it)."""
    from lm_eval.tasks._index import TaskIndex

    build = getattr(TaskIndex.build, "_megastack_original", TaskIndex.build)
    return build(paths, resolve_includes=resolve_includes)


def install(cache_dir: Path = DEFAULT_CACHE_DIR) -> bool:
    """Make every ``TaskManager`` of this process read lm-eval's own folder from the cache (idempotent).

    Returns False, leaving lm-eval untouched, when this lm-eval has no ``TaskIndex.build`` to stand in for."""
    try:
        from lm_eval.tasks import manager
        from lm_eval.tasks._index import TaskIndex
    except ImportError:
        return False
    if not callable(getattr(TaskIndex, "build", None)):
        logger.info("this lm-eval has no TaskIndex.build; its task index is parsed every time")
        return False
    if getattr(TaskIndex.build, "_megastack_cached", False):
        return True
    defaults_root = Path(manager.__file__).parent.resolve()

    def build(paths, *, resolve_includes: bool = True) -> dict[str, Any]:
        index: dict[str, Any] = {}
        for root in paths:
            part = (
                load_or_build(root, cache_dir, resolve_includes=resolve_includes)
                if Path(root).resolve() == defaults_root
                else _parse([root], resolve_includes)
            )
            for name, entry in part.items():
                if name in index:
                    logger.warning(
                        "Task '%s' from %s overrides existing task from %s",
                        name,
                        entry.yaml_path,
                        index[name].yaml_path,
                    )
                index[name] = entry
        return index

    build._megastack_cached = True
    build._megastack_original = TaskIndex.build
    TaskIndex.build = staticmethod(build)
    return True
