"""The offline task suite shipped in deploy/eval-suite, rendered with absolute data paths for lm-eval."""

from __future__ import annotations

from pathlib import Path

from shared.paths import CACHE_DIR, REPO_ROOT

SUITE_DIR = REPO_ROOT / "deploy" / "eval-suite"
PLACEHOLDER = "__SUITE_DATA__"


def render(out: Path = CACHE_DIR / "eval-suite") -> Path:
    """Write the suite's task YAMLs with ``__SUITE_DATA__`` resolved; returns the folder (an include path)."""
    out.mkdir(parents=True, exist_ok=True)
    data = (SUITE_DIR / "data").resolve()
    for src in sorted((SUITE_DIR / "tasks").glob("*.yaml")):
        text = src.read_text().replace(PLACEHOLDER, str(data))
        target = out / src.name
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
    return out
