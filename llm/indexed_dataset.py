"""Megatron's indexed dataset (``.bin`` + ``.idx``, "MMIDIDX"): streaming writer, reader, checker.

Byte layout (megatron/core/datasets/indexed_dataset.py, the same in v0.8 and main), little-endian:
``.idx`` = magic ``MMIDIDX\\0\\0`` | version u64 = 1 | dtype code u8 | sequence count N u64 |
document count D u64 | int32 lengths[N] | int64 byte pointers[N] | int64 document indices[D];
``.bin`` = the token arrays, concatenated, in that dtype. ``document indices`` are sequence-index
boundaries ``[0, ..., N]``; an empty document repeats a boundary.

The writer keeps lengths and boundaries in temporary files instead of lists, so memory stays flat
however large the corpus (Megatron's builder keeps them in RAM; users report MemoryErrors in
``finalize`` at 31M documents). Output appears atomically: ``.bin`` and ``.idx`` are written under
temporary names and renamed at the end, ``.idx`` last, so a crash never leaves a pair that looks complete.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
HEADER_BYTES = 34


def optimal_dtype(vocab_size: int | None) -> type:
    """Megatron's DType.optimal_dtype: uint16 when the vocabulary has fewer than 65500 entries."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_path(prefix: str | Path) -> Path:
    """``{prefix}.bin``."""
    return Path(f"{prefix}.bin")


def index_path(prefix: str | Path) -> Path:
    """``{prefix}.idx``."""
    return Path(f"{prefix}.idx")


class IndexedDatasetWriter:
    """Append documents (each a list of sequences) and finish with an atomic rename."""

    def __init__(self, prefix: str | Path, dtype: type = np.int32) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported dtype {dtype}")
        self._dtype_type = dtype
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.prefix.name}-", dir=self.prefix.parent))
        self._bin = open(self._tmp / "data.bin", "wb")
        self._lengths = open(self._tmp / "lengths.i32", "wb")
        self._docs = open(self._tmp / "docs.i64", "wb")
        self._docs.write(np.array([0], dtype=np.int64).tobytes())
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False

    def add_document(self, sequences: list[np.ndarray]) -> None:
        """One document = one or more sequences (sentences); an empty list records an empty document."""
        for seq in sequences:
            arr = np.asarray(seq, dtype=self.dtype)
            self._bin.write(arr.tobytes())
            self.num_tokens += arr.size
        if sequences:
            self._lengths.write(
                np.fromiter((len(s) for s in sequences), dtype=np.int32, count=len(sequences)).tobytes()
            )
        self.num_sequences += len(sequences)
        self.num_documents += 1
        self._docs.write(struct.pack("<q", self.num_sequences))

    def add_flat(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Many one-sequence documents at once: ``tokens`` concatenated, ``lengths`` per document."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.write(np.asarray(lengths, dtype=np.int32).tobytes())
        n = len(lengths)
        self._docs.write(
            np.arange(self.num_sequences + 1, self.num_sequences + n + 1, dtype=np.int64).tobytes()
        )
        self.num_sequences += n
        self.num_documents += n
        self.num_tokens += int(np.asarray(lengths).sum())

    def append_dataset(self, prefix: str | Path) -> None:
        """Megatron's add_index: concatenate another finished dataset of the same dtype (streamed)."""
        other = IndexedDatasetReader(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge {prefix} ({other.dtype}) into a {self.dtype} dataset")
        with open(data_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)
        self._lengths.write(np.asarray(other.lengths, dtype=np.int32).tobytes())
        docs = np.asarray(other.document_indices[1:], dtype=np.int64) + self.num_sequences
        self._docs.write(docs.tobytes())
        self.num_sequences += len(other.lengths)
        self.num_documents += len(other.document_indices) - 1
        self.num_tokens += int(np.asarray(other.lengths, dtype=np.int64).sum())

    def finish(self) -> tuple[Path, Path]:
        """Flush, write the index, and move both files into place (.idx last, so a reader never sees half a
        pair)."""
        for f in (self._bin, self._lengths, self._docs):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        idx_tmp = self._tmp / "data.idx"
        self._write_index(idx_tmp)
        final_bin, final_idx = data_path(self.prefix), index_path(self.prefix)
        final_idx.unlink(missing_ok=True)  # an old .idx must never pair with the new .bin
        os.replace(self._tmp / "data.bin", final_bin)
        os.replace(idx_tmp, final_idx)  # last: the pair is complete only now
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._done = True
        return final_bin, final_idx

    def _write_index(self, path: Path) -> None:
        n, d = self.num_sequences, self.num_documents + 1
        itemsize = self.dtype.itemsize
        with open(path, "wb") as out:
            out.write(MAGIC)
            out.write(struct.pack("<Q", VERSION))
            out.write(struct.pack("<B", DTYPE_CODES[self._dtype_type]))
            out.write(struct.pack("<Q", n))
            out.write(struct.pack("<Q", d))
            with open(self._tmp / "lengths.i32", "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
            # byte pointers = exclusive cumulative sum of lengths * itemsize, computed in chunks
            offset = 0
            with open(self._tmp / "lengths.i32", "rb") as f:
                while chunk := f.read(4 << 20):
                    lengths = np.frombuffer(chunk, dtype=np.int32).astype(np.int64)
                    ptrs = np.empty_like(lengths)
                    ptrs[0:1] = offset
                    np.cumsum(lengths[:-1] * itemsize, out=ptrs[1:])
                    ptrs[1:] += offset
                    offset += int(lengths.sum()) * itemsize
                    out.write(ptrs.tobytes())
            with open(self._tmp / "docs.i64", "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())

    def abort(self) -> None:
        """Drop the partial output (the temporary folder); nothing is left at the prefix."""
        if self._done:
            return
        for f in (self._bin, self._lengths, self._docs):
            if not f.closed:
                f.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


@dataclass
class IndexedDatasetReader:
    """Memory-mapped view of a finished dataset (what megatron's IndexedDataset reads)."""

    prefix: Path

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx = index_path(prefix)
        with open(idx, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:9] != MAGIC:
            raise ValueError(f"{idx}: not a Megatron index (bad magic)")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise ValueError(f"{idx}: unsupported version {version}")
        code = head[17]
        if code not in CODE_DTYPES:
            raise ValueError(f"{idx}: unknown dtype code {code}")
        self.dtype = np.dtype(CODE_DTYPES[code])
        self.num_sequences, self.num_documents_plus_one = struct.unpack("<QQ", head[18:34])
        n, d = self.num_sequences, self.num_documents_plus_one
        expected = HEADER_BYTES + 12 * n + 8 * d
        size = idx.stat().st_size
        if size != expected:
            raise ValueError(
                f"{idx}: {size} bytes, expected {expected} for {n} sequences and {d} document boundaries"
            )
        mm = np.memmap(idx, mode="r", dtype=np.uint8)
        self.lengths = np.frombuffer(mm, dtype=np.int32, count=n, offset=HEADER_BYTES)
        self.pointers = np.frombuffer(mm, dtype=np.int64, count=n, offset=HEADER_BYTES + 4 * n)
        self.document_indices = np.frombuffer(mm, dtype=np.int64, count=d, offset=HEADER_BYTES + 12 * n)
        binf = data_path(prefix)
        self._bin = (
            np.memmap(binf, mode="r", dtype=self.dtype) if binf.stat().st_size else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return self.num_sequences

    @property
    def num_documents(self) -> int:
        """Documents in the dataset."""
        return self.num_documents_plus_one - 1

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self._bin[start : start + int(self.lengths[i])])

    def document(self, j: int) -> list[np.ndarray]:
        """The sequences of document ``j``."""
        return [self[i] for i in range(int(self.document_indices[j]), int(self.document_indices[j + 1]))]

    def verify(self) -> list[str]:
        """Consistency problems between .idx and .bin (empty list = consistent)."""
        problems = []
        n = self.num_sequences
        if n and (self.lengths < 0).any():
            problems.append("negative sequence length")
        itemsize = self.dtype.itemsize
        if n:
            expected = np.zeros(n, dtype=np.int64)
            np.cumsum(self.lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
            bad = np.nonzero(self.pointers != expected)[0]
            if bad.size:
                problems.append(
                    f"pointer of sequence {int(bad[0])} is {int(self.pointers[bad[0]])}, expected "
                    f"{int(expected[bad[0]])}"
                )
        docs = self.document_indices
        if docs.size == 0 or docs[0] != 0:
            problems.append("document indices must start at 0")
        if docs.size and docs[-1] != n:
            problems.append(f"last document boundary is {int(docs[-1])}, expected {n} (the sequence count)")
        if docs.size > 1 and (np.diff(docs) < 0).any():
            problems.append("document indices decrease")
        total = int(self.lengths.astype(np.int64).sum()) * itemsize
        size = data_path(self.prefix).stat().st_size
        if size != total:
            problems.append(f"{data_path(self.prefix)} has {size} bytes, the index describes {total}")
        return problems
