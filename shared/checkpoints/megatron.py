"""Megatron checkpoints (mcore torch_dist and the legacy mp_rank_XX layout): detection and reading."""

from __future__ import annotations

from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"


def iteration_dir(path: Path) -> Path | None:
    """The folder holding the newest checkpoint (iter_XXXXXXX or release), from the tracker file."""
    path = Path(path)
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if name and (path / name).is_dir():
            return path / name
    for name in ["release", *sorted((p.name for p in path.glob("iter_*")), reverse=True)]:
        if (path / name).is_dir():
            return path / name
    return None


def detect_megatron_format(path: Path) -> str | None:
    d = iteration_dir(path)
    if d is None:
        return None
    if (d / "metadata.json").is_file():
        return "mcore"
    if any(d.glob("mp_rank_*/model_optim_rng.pt")):
        return "legacy"
    return None


class MegatronCheckpoint:
    def __init__(self, path: Path, fmt: str) -> None:
        from shared.errors import FailedPrecondition

        raise FailedPrecondition(f"reading {fmt} checkpoints lands with the converter (issue 7): {path}")
