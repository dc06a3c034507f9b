"""The preprocessing run: records in, Megatron indexed datasets out.

A reader thread parses input into batches (bounded queue) while the main thread tokenizes them with
the Rust tokenizer (``encode_batch`` releases the GIL and uses ``workers`` threads) and appends to the
dataset writers; memory is a few batches, whatever the corpus size. With ``partitions > 1`` each part
of the input runs in its own process and the parts are merged in order, as Megatron does.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from llm.indexed_dataset import IndexedDatasetWriter, optimal_dtype
from llm.sft_records import SFTEncoder
from tools.preprocess.handlers import HANDLERS, Packer, split_sentences, text_of
from tools.preprocess.readers import InputError, Record, iter_records, list_inputs

BATCH_DOCS = 512
BATCH_BYTES = 2 << 20


@dataclass
class Options:
    input: Path
    output_prefix: str
    json_keys: tuple[str, ...] = ("text",)
    tokenizer_type: str = "PretrainedFromHF"
    tokenizer_name_or_path: Path | None = None
    vocab_file: Path | None = None
    merge_file: Path | None = None
    append_eod: bool = False
    add_bos: bool = False
    split_sentences: bool = False
    keep_newlines: bool = False
    workers: int = 1
    partitions: int = 1
    handler_name: str = "GeneralPretrainHandler"
    seq_length: int = 0
    pack: bool = False
    neat_pack: bool = False
    prompt_type: str = "auto"
    map_keys: dict = field(default_factory=dict)
    skip_bad: bool = False
    keep_empty: bool = False
    max_documents: int = 0


@dataclass
class Summary:
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    dtype: str = ""
    first_error: str = ""

    def merge(self, other: Summary) -> None:
        for k in ("documents", "sequences", "tokens", "input_bytes", "output_bytes"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.skipped.update(other.skipped)
        self.first_error = self.first_error or other.first_error


Progress = Callable[[int, int], None]  # (input bytes done, documents done)


def load_tokenizer(o: Options):
    from llm.tokenizers import FastTokenizer

    if o.tokenizer_type == "GPT2BPETokenizer":
        if not (o.vocab_file and o.merge_file):
            raise ValueError("GPT2BPETokenizer needs --vocab-file and --merge-file")
        return FastTokenizer.gpt2_bpe(o.vocab_file, o.merge_file)
    if o.tokenizer_type in ("PretrainedFromHF", "HuggingFaceTokenizer"):
        if o.tokenizer_name_or_path is None:
            raise ValueError(f"{o.tokenizer_type} needs --tokenizer-name-or-path (a local tokenizer folder)")
        return FastTokenizer.from_dir(o.tokenizer_name_or_path)
    raise ValueError(f"unsupported --tokenizer-type {o.tokenizer_type}")


def output_names(o: Options) -> list[str]:
    if HANDLERS[o.handler_name] == "pretrain":
        level = "sentence" if o.split_sentences else "document"
        return [f"{o.output_prefix}_{key}_{level}" for key in o.json_keys]
    return [f"{o.output_prefix}_packed_{k}_document" for k in ("input_ids", "attention_mask", "labels")]


def _batches(files: list[Path], byte_range: tuple[int, int] | None) -> Iterator[list[Record]]:
    batch: list[Record] = []
    size = 0
    for f in files:
        for rec in _ranged(f, byte_range) if byte_range else iter_records(f):
            batch.append(rec)
            size += rec.nbytes
            if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _ranged(path: Path, byte_range: tuple[int, int]) -> Iterator[Record]:
    """JSON lines of one file between two byte offsets (a partition of a single plain .jsonl)."""
    import json

    start, end = byte_range
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # finish the line that belongs to the previous partition
        pos = f.tell()
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            where = f"{path}:byte {pos - len(raw)}"
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield Record(where, None, len(raw), InputError(where, f"malformed line ({e})", "json"))
                continue
            yield Record(
                where,
                doc if isinstance(doc, dict) else None,
                len(raw),
                None if isinstance(doc, dict) else InputError(where, "expected a JSON object", "json"),
            )


def _prefetch(it: Iterator[list[Record]], depth: int = 4) -> Iterator[list[Record]]:
    """Parse ahead on a thread (bounded) while the caller tokenizes."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    threading.Thread(target=work, name="preprocess-reader", daemon=True).start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while not q.empty():
            q.get_nowait()


class _Run:
    def __init__(self, o: Options, tok, names: list[str]) -> None:
        self.o, self.tok, self.names = o, tok, names
        self.kind = HANDLERS[o.handler_name]
        self.summary = Summary()
        dtype = optimal_dtype(tok.vocab_size) if self.kind == "pretrain" else np.int32
        self.summary.dtype = np.dtype(dtype).name
        self.writers = [IndexedDatasetWriter(n, dtype) for n in names]
        self.sft = (
            SFTEncoder(tok, style=self.kind, prompt_type=o.prompt_type, map_keys=o.map_keys)
            if self.kind != "pretrain"
            else None
        )
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        self.packer = (
            Packer(o.seq_length, pad or 0, o.neat_pack) if (self.kind != "pretrain" and o.pack) else None
        )

    def bad(self, err: InputError) -> None:
        if not self.o.skip_bad:
            raise err
        self.summary.skipped[err.kind] += 1
        self.summary.first_error = self.summary.first_error or str(err)

    def add_pretrain_batch(self, records: list[Record]) -> None:
        o, tok = self.o, self.tok
        texts: list[list] = [[] for _ in o.json_keys]
        for rec in records:
            self.summary.input_bytes += rec.nbytes
            if rec.error is not None:
                self.bad(rec.error)
                continue
            try:
                row = [text_of(rec.data, key, rec.where) for key in o.json_keys]
            except InputError as e:
                self.bad(e)
                continue
            empty = [k for k, t in zip(o.json_keys, row) if not t]
            if empty and not o.keep_empty:
                self.bad(
                    InputError(
                        rec.where,
                        f"empty document for key '{empty[0]}' (--keep-empty records it as Megatron does)",
                        "empty",
                    )
                )
                continue
            for j, t in enumerate(row):
                texts[j].append(t)
        eod = tok.eod_id if o.append_eod else None
        bos = tok.bos_id if o.add_bos else None
        for j, writer in enumerate(self.writers):
            seqs, tokens = self._write_docs(writer, texts[j], eod, bos)
            self.summary.tokens += tokens
            if j == 0:  # a record is one document in every key's dataset; count it once
                self.summary.documents += len(texts[j])
                self.summary.sequences += seqs

    def _write_docs(
        self, writer: IndexedDatasetWriter, docs: list, eod: int | None, bos: int | None
    ) -> tuple[int, int]:
        """Append documents; returns (sequences, tokens) written."""
        o = self.o
        if not o.split_sentences and all(isinstance(d, str) for d in docs):
            encoded = self.tok.encode_batch(docs) if docs else []
            lengths = np.fromiter((len(x) for x in encoded), dtype=np.int64, count=len(encoded))
            if (lengths > 0).all():  # hot path: one document = one sequence, one flat array per batch
                for ids in encoded:  # fresh lists from the tokenizer: extended in place
                    if eod is not None:
                        ids.append(eod)
                    if bos is not None:
                        ids.insert(0, bos)
                lengths += (eod is not None) + (bos is not None)
                flat = np.fromiter(chain.from_iterable(encoded), dtype=writer.dtype, count=int(lengths.sum()))
                writer.add_flat(flat, lengths)
                return len(docs), int(lengths.sum())
            per_doc = [[ids] if ids else [] for ids in encoded]
        else:
            per_doc = []
            for d in docs:
                sentences = (
                    d
                    if isinstance(d, list)
                    else (split_sentences(d, o.keep_newlines) if o.split_sentences else [d])
                )
                per_doc.append([s for s in self.tok.encode_batch(sentences) if s] if sentences else [])
        seqs = tokens = 0
        for doc in per_doc:
            # Megatron: the sentences' tokens, EOD appended to the last one; an empty document stays empty.
            if doc and eod is not None:
                doc[-1] = [*doc[-1], eod]
            if doc and bos is not None:
                doc[0] = [bos, *doc[0]]
            writer.add_document([np.asarray(s) for s in doc])
            seqs += len(doc)
            tokens += sum(len(s) for s in doc)
        return seqs, tokens

    def add_sft_batch(self, records: list[Record]) -> None:
        o = self.o
        for rec in records:
            self.summary.input_bytes += rec.nbytes
            if rec.error is not None:
                self.bad(rec.error)
                continue
            try:
                ids, labels = self.sft.encode(rec.data, rec.where)
            except InputError as e:
                self.bad(e)
                continue
            if o.seq_length and len(ids) > o.seq_length:
                self.bad(
                    InputError(
                        rec.where,
                        f"sample of {len(ids)} tokens is longer than --seq-length {o.seq_length}",
                        "too_long",
                    )
                )
                continue
            if self.packer is not None:
                for packed in self.packer.add(ids, labels):
                    self._write_sft(*packed)
            else:
                self._write_sft(
                    np.array(ids, np.int32), np.array(labels, np.int32), np.ones(len(ids), np.int32)
                )

    def _write_sft(self, ids: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> None:
        for w, arr in zip(self.writers, (ids, mask, labels)):
            w.add_document([arr])
        self.summary.documents += 1
        self.summary.sequences += 1
        self.summary.tokens += len(ids)

    def finish(self) -> None:
        if self.packer is not None and self.packer.ids:
            self._write_sft(*self.packer.flush())
        for w in self.writers:
            b, i = w.finish()
            self.summary.output_bytes += b.stat().st_size + i.stat().st_size

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


def process(
    o: Options,
    files: list[Path],
    names: list[str],
    progress: Progress | None = None,
    byte_range: tuple[int, int] | None = None,
) -> Summary:
    tok = load_tokenizer(o)
    run = _Run(o, tok, names)
    try:
        add = run.add_pretrain_batch if run.kind == "pretrain" else run.add_sft_batch
        for batch in _prefetch(_batches(files, byte_range)):
            if o.max_documents and run.summary.documents >= o.max_documents:
                break
            add(batch)
            if progress is not None:
                progress(run.summary.input_bytes, int(run.summary.documents))
        run.finish()
    except BaseException:
        run.abort()
        raise
    return run.summary


def partition_plan(files: list[Path], n: int) -> list[tuple[list[Path], tuple[int, int] | None]]:
    """Split the input in n contiguous parts: by byte range for one plain .jsonl, else by files."""
    if n <= 1:
        return [(files, None)]
    if len(files) == 1 and files[0].name.endswith(".jsonl"):
        size = files[0].stat().st_size
        cuts = [size * i // n for i in range(n + 1)]
        return [([files[0]], (cuts[i], cuts[i + 1])) for i in range(n)]
    per = -(-len(files) // n)
    return [(files[i : i + per], None) for i in range(0, len(files), per)]


def _partition_worker(o: Options, files, byte_range, names, counters, index) -> None:
    def progress(nbytes: int, docs: int) -> None:
        counters[2 * index], counters[2 * index + 1] = nbytes, docs

    summary = process(o, files, names, progress, byte_range)
    counters[2 * index] = summary.input_bytes
    with open(f"{names[0]}.summary.json", "w") as f:
        import json

        f.write(json.dumps({**dataclasses.asdict(summary), "skipped": dict(summary.skipped)}))


def run(o: Options, progress: Progress | None = None) -> Summary:
    """Preprocess ``o.input``; returns the summary. Output pairs appear atomically at the end."""
    t0 = time.perf_counter()
    files = list_inputs(o.input)
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, o.workers // max(1, o.partitions))))
    names = output_names(o)
    plan = partition_plan(files, o.partitions)
    if len(plan) == 1:
        summary = process(o, files, names, progress, plan[0][1])
    else:
        summary = _run_partitions(o, plan, names, progress)
    summary.outputs = names
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_partitions(o: Options, plan, names: list[str], progress: Progress | None) -> Summary:
    import json
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    counters = ctx.Array("q", 2 * len(plan))
    parts = [[f"{n}.part{i:03d}" for n in names] for i in range(len(plan))]
    procs = [
        ctx.Process(target=_partition_worker, args=(o, files, br, parts[i], counters, i), daemon=True)
        for i, (files, br) in enumerate(plan)
    ]
    try:
        for p in procs:
            p.start()
        while any(p.is_alive() for p in procs):
            if progress is not None:
                progress(sum(counters[0::2]), sum(counters[1::2]))
            time.sleep(0.2)
        bad = [i for i, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"partition {bad[0]} failed (exit code {procs[bad[0]].exitcode})")
        summary = Summary()
        for part in parts:
            doc = json.loads(Path(f"{part[0]}.summary.json").read_text())
            s = Summary(
                **{
                    k: v
                    for k, v in doc.items()
                    if k
                    in (
                        "documents",
                        "sequences",
                        "tokens",
                        "input_bytes",
                        "output_bytes",
                        "dtype",
                        "first_error",
                    )
                }
            )
            s.skipped = Counter(doc["skipped"])
            summary.merge(s)
            summary.dtype = s.dtype
        summary.output_bytes = 0
        for j, name in enumerate(names):  # merge in input order (Megatron's add_index)
            from llm.indexed_dataset import IndexedDatasetReader

            writer = IndexedDatasetWriter(name, IndexedDatasetReader(parts[0][j]).dtype.type)
            try:
                for part in parts:
                    writer.append_dataset(part[j])
                b, i = writer.finish()
            except BaseException:
                writer.abort()
                raise
            summary.output_bytes += b.stat().st_size + i.stat().st_size
        return summary
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for part in parts:
            for name in part:
                for suffix in (".bin", ".idx", ".summary.json"):
                    Path(name + suffix).unlink(missing_ok=True)
