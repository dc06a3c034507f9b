"""The evaluator's content-addressed request cache: what a served model answered to a scoring or
generation request, kept on disk across evaluations.

A key is the sha256 of everything the answer depends on: the model's identity (its checkpoint's and
tokenizer's fingerprints, from textgen's GetModelInfo), the engine's numeric mode (dtype, device type,
batch invariance), the request kind and its token ids, and for scoring the first scored position, for
generation the generation parameters. So re-running a finished evaluation sends nothing to textgen, a run
that was killed resumes with only the requests it had not got answers for, and another checkpoint, tokenizer,
dtype or parameter never reads another's entries.

One sqlite file (WAL, a transaction per batch of answers: a kill loses at most the batch in flight).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any


def namespace(info: Any) -> str:
    """The part of every key that names the model and how it computes: from a GetModelInfoResponse."""
    device_type = info.device.split(":")[0]
    parts = [info.checkpoint_id, info.tokenizer_id, info.dtype, device_type, info.batch_invariant]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def request_key(ns: str, kind: str, ids: list[int], extra: bytes | str = b"") -> str:
    """The key of one request of ``kind`` with prompt ``ids`` (and ``extra``: what else its answer depends
    on) under namespace ``ns``."""
    h = hashlib.sha256(f"{ns}\0{kind}\0".encode())
    h.update(extra.encode() if isinstance(extra, str) else extra)
    h.update(b"\0")
    h.update(",".join(map(str, ids)).encode())
    return h.hexdigest()


class RequestCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()
        self.hits = 0
        self.misses = 0

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        """The cached answers of those of ``keys`` that are cached (counted as hits; the rest as misses)."""
        found: dict[str, Any] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                part = keys[i : i + 500]
                marks = ",".join("?" * len(part))
                for key, value in self._db.execute(
                    f"SELECT key, value FROM answers WHERE key IN ({marks})", part
                ):
                    found[key] = json.loads(value)
        self.hits += len(found)
        self.misses += len(set(keys)) - len(found)
        return found

    def put_many(self, items: dict[str, Any]) -> None:
        if not items:
            return
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in items.items()],
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
