"""A checkpoint's identity without reading all of it: a hash over its files' names, sizes and first and
last MiBs (a re-save, a retrained or resharded checkpoint changes at least one of them; a copy to another
folder keeps it). What caches of model outputs are keyed by (the evaluator's request cache)."""

from __future__ import annotations

import hashlib
from pathlib import Path

EDGE = 1 << 20  # bytes read from each end of a file
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def fingerprint(files: list[Path], root: Path) -> str:
    """sha256 hex over ``files`` (sorted by their path below ``root``): name, size, first and last MiB."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
        with f.open("rb") as fh:
            h.update(fh.read(EDGE))
            if size > 2 * EDGE:
                fh.seek(size - EDGE)
                h.update(fh.read(EDGE))
            elif size > EDGE:
                h.update(fh.read())
    return h.hexdigest()


def checkpoint_id(path: Path) -> str:
    """The fingerprint of every regular file under a checkpoint folder (hidden files aside)."""
    root = Path(path)
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(x.startswith(".") for x in p.relative_to(root).parts)
    ]
    return fingerprint(files, root)


def tokenizer_id(path: Path) -> str:
    """The fingerprint of a tokenizer folder's tokenizer files."""
    root = Path(path)
    return fingerprint([root / n for n in TOKENIZER_FILES if (root / n).is_file()], root)
