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


class SafetensorsFile:
    """Read tensors one at a time with pread (no mmap): memory holds only the tensors in use.

    safetensors' own ``safe_open`` maps the whole file, and every page it touches counts in the
    process RSS until the mapping is closed; reading into fresh buffers keeps RSS at one tensor.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) != 8:
            raise ValueError("file is shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
        header = json.loads(os.pread(self._fd, n, 8))
        self.metadata = header.pop("__metadata__", {})
        self.base = 8 + n
        self.entries: dict[str, dict] = header
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if self.base + end > size:
                raise ValueError(
                    f"tensor {name} ends at byte {self.base + end} but the file has {size} (truncated?)"
                )

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        buf = bytearray(end - begin)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = os.preadv(self._fd, [view[got:]], self.base + begin + got)
            if n <= 0:
                raise ValueError(f"{self.path}: unexpected end of file reading {name}")
            got += n
        dtype = CODE_DTYPES[e["dtype"]]
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])

    def close(self) -> None:
        os.close(self._fd)


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


CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (any dtype, bf16 included) without an extra copy."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy().data)


def write_safetensors(
    path: Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> int:
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
