"""Streaming record readers for every supported input type, with file:line positions for errors.

Nothing reads a whole corpus into memory: JSON lines (plain, .gz, .zst) and CSV/TXT are read line by
line, Parquet and Arrow by record batch. A ``.json`` file holding one JSON array is the exception (it
has to be parsed whole) and is therefore limited in size.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.sft_records import InputError

SUFFIXES = (
    ".jsonl",
    ".json",
    ".parquet",
    ".csv",
    ".txt",
    ".arrow",
    ".jsonl.gz",
    ".json.gz",
    ".jsonl.zst",
    ".json.zst",
)
MAX_JSON_ARRAY_BYTES = 256 << 20


@dataclass
class Record:
    where: str  # file:line, for messages
    data: dict[str, Any] | None
    nbytes: int  # input bytes this record came from (for MB/s)
    error: InputError | None = None


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def list_inputs(path: Path) -> list[Path]:
    """A file, or every supported file of a folder (sorted, so the document order is reproducible)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    supported = [f for f in files if suffix_of(f) in SUFFIXES]
    bad = [f for f in files if suffix_of(f) not in SUFFIXES and not f.name.startswith(".")]
    if path.is_file() and bad:
        raise InputError(
            str(path),
            f"unsupported input type '{suffix_of(path)}' (supported: {', '.join(SUFFIXES)})",
            "extension",
        )
    if not supported:
        raise InputError(
            str(path), f"no input files with a supported extension ({', '.join(SUFFIXES)})", "extension"
        )
    return supported


def _open_text_lines(path: Path) -> io.BufferedReader | Any:
    s = suffix_of(path)
    if s.endswith(".gz"):
        return gzip.open(path, "rb")
    if s.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})", "encoding"
        ) from None


def iter_records(path: Path) -> Iterator[Record]:
    s = suffix_of(path)
    if s in (".parquet", ".arrow"):
        yield from _iter_arrow(path, s)
    elif s == ".csv":
        yield from _iter_csv(path)
    elif s == ".txt":
        yield from _iter_txt(path)
    else:
        yield from _iter_json(path)


def _iter_json(path: Path) -> Iterator[Record]:
    with _open_text_lines(path) as f:
        first = f.peek(64)[:64].lstrip() if hasattr(f, "peek") else b""
        if first.startswith(b"["):
            yield from _iter_json_array(path, f)
            return
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            if not raw.strip():
                continue
            try:
                doc = json.loads(_decode(raw, where))
            except InputError as e:
                yield Record(where, None, len(raw), e)
                continue
            except json.JSONDecodeError as e:
                yield Record(
                    where,
                    None,
                    len(raw),
                    InputError(
                        where, f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})", "json"
                    ),
                )
                continue
            if not isinstance(doc, dict):
                yield Record(
                    where,
                    None,
                    len(raw),
                    InputError(where, f"expected a JSON object, got {type(doc).__name__}", "json"),
                )
                continue
            yield Record(where, doc, len(raw))


def _iter_json_array(path: Path, f) -> Iterator[Record]:
    if path.stat().st_size > MAX_JSON_ARRAY_BYTES:
        raise InputError(
            str(path),
            f"a JSON array over {MAX_JSON_ARRAY_BYTES >> 20} MB cannot be streamed; convert it to JSON lines",
            "json",
        )
    raw = f.read()
    try:
        docs = json.loads(_decode(raw, str(path)))
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}:{e.lineno}", f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})", "json"
        ) from None
    per = max(1, len(raw) // max(1, len(docs)))
    for i, doc in enumerate(docs, 1):
        where = f"{path}:item {i}"
        if isinstance(doc, dict):
            yield Record(where, doc, per)
        else:
            yield Record(
                where,
                None,
                per,
                InputError(where, f"expected a JSON object, got {type(doc).__name__}", "json"),
            )


def _iter_csv(path: Path) -> Iterator[Record]:
    with open(path, "rb") as fb:
        text = io.TextIOWrapper(fb, encoding="utf-8", errors="strict", newline="")
        reader = csv.DictReader(text)
        prev = 0
        try:
            for row in reader:
                pos = fb.tell()
                yield Record(f"{path}:{reader.line_num}", dict(row), max(0, pos - prev))
                prev = pos
        except UnicodeDecodeError as e:
            where = f"{path}:{reader.line_num + 1}"
            yield Record(where, None, 0, InputError(where, f"not valid UTF-8 ({e.reason})", "encoding"))


def _iter_txt(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path}:{line_no}"
            try:
                yield Record(where, {"text": _decode(raw, where).rstrip("\n")}, len(raw))
            except InputError as e:
                yield Record(where, None, len(raw), e)


def _iter_arrow(path: Path, s: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if s == ".parquet":
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=1024)
        total_rows = max(1, pf.metadata.num_rows)
    else:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
        batches, total_rows = reader, None
    size = path.stat().st_size
    row = 0
    for batch in batches:
        per = size // (total_rows or max(1, batch.num_rows)) if total_rows else size // max(1, batch.num_rows)
        for doc in batch.to_pylist():
            row += 1
            yield Record(f"{path}:row {row}", doc, per)
