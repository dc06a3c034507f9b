"""Streaming safetensors writer: tensors go to disk one at a time, so memory stays at one tensor.

The safetensors header (names, dtypes, shapes, offsets) must precede the data, but shapes are only
known as tensors arrive. Data is therefore spooled to a sibling file, then the header and the data are
joined with a kernel-side copy. The result is byte-for-byte a standard safetensors file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (any dtype, bf16 included) without an extra copy."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` to ``path``; returns the file size. Names must be unique."""
    path = Path(path)
    spool = path.with_name(path.name + ".data")
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    try:
        with open(spool, "wb") as data:
            for name, t in tensors:
                if name in header:
                    raise ValueError(f"duplicate tensor name {name}")
                raw = tensor_bytes(t)
                data.write(raw)
                header[name] = {
                    "dtype": DTYPE_CODES[t.dtype],
                    "shape": list(t.shape),
                    "data_offsets": [offset, offset + raw.nbytes],
                }
                offset += raw.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data section is 8-byte aligned
        with open(path, "wb") as out, open(spool, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            out.flush()
            _copy(data, out, offset)
            out.flush()
            os.fsync(out.fileno())
    finally:
        if spool.exists():
            spool.unlink()
    return path.stat().st_size


def _copy(src, dst, size: int) -> None:
    try:
        sent = 0
        while sent < size:
            n = os.sendfile(dst.fileno(), src.fileno(), sent, size - sent)
            if n == 0:
                break
            sent += n
        dst.seek(0, os.SEEK_END)
    except OSError:
        src.seek(0)
        shutil.copyfileobj(src, dst, 16 << 20)
