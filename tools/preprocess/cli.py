"""Flags of `tools/preprocess_data.py` / `megastack preprocess`: Megatron's and ModelLink's names."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tools.preprocess.handlers import HANDLERS

DESCRIPTION = (
    "Turn raw corpora (jsonl/json/parquet/csv/txt/arrow, .gz/.zst jsonl, or a folder of them) into the "
    ".bin/.idx indexed datasets megatron-core's IndexedDataset and GPTDataset read: pretraining text, or "
    "Alpaca/ShareGPT SFT samples with prompt-masked labels."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input and output")
    g.add_argument("--input", type=Path, required=True, help="a file or a folder of supported files")
    g.add_argument(
        "--output-prefix",
        required=True,
        help="outputs are {prefix}_{key}_document.{bin,idx} (SFT: {prefix}_packed_*)",
    )
    g.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys to extract (one dataset each); default: text"
    )
    g.add_argument("--max-documents", type=int, default=0, help="stop after this many documents (0 = all)")
    t = p.add_argument_group("tokenizer")
    t.add_argument(
        "--tokenizer-type",
        default="PretrainedFromHF",
        choices=("PretrainedFromHF", "HuggingFaceTokenizer", "GPT2BPETokenizer"),
    )
    t.add_argument(
        "--tokenizer-name-or-path",
        "--tokenizer-model",
        type=Path,
        default=None,
        help="local HF tokenizer folder",
    )
    t.add_argument("--vocab-file", type=Path, default=None, help="GPT2BPETokenizer vocab.json")
    t.add_argument("--merge-file", type=Path, default=None, help="GPT2BPETokenizer merges.txt")
    t.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document token to every document"
    )
    t.add_argument(
        "--add-bos", action="store_true", help="prepend the tokenizer's BOS token to every document"
    )
    t.add_argument(
        "--split-sentences", action="store_true", help="one sequence per sentence (rule-based splitter)"
    )
    t.add_argument("--keep-newlines", action="store_true", help="keep newlines when splitting sentences")
    h = p.add_argument_group("handlers (ModelLink)")
    h.add_argument(
        "--handler-name",
        default="GeneralPretrainHandler",
        choices=sorted(k for k in HANDLERS if k),
        help="GeneralPretrainHandler (default), AlpacaStyleInstructionHandler, "
        "SharegptStyleInstructionHandler",
    )
    h.add_argument(
        "--prompt-type",
        default="auto",
        choices=("auto", "chat_template", "alpaca"),
        help="SFT layout: the tokenizer's chat template (auto when it has one) or the Alpaca prompt",
    )
    h.add_argument(
        "--map-keys",
        type=json.loads,
        default={},
        help='JSON key overrides, e.g. \'{"messages":"messages","tags":{"role_tag":"role"}}\'',
    )
    h.add_argument(
        "--seq-length", type=int, default=0, help="SFT: longest sample (longer ones are skipped), pack size"
    )
    h.add_argument("--pack", action="store_true", help="SFT: pack samples into --seq-length windows")
    h.add_argument(
        "--neat-pack", action="store_true", help="SFT packing: attention mask holds the sample index"
    )
    r = p.add_argument_group("run")
    r.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="tokenizer threads (default: all cores)"
    )
    r.add_argument(
        "--partitions", type=int, default=1, help="input parts processed by separate processes, then merged"
    )
    r.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed records (counted and reported) instead of stopping",
    )
    r.add_argument(
        "--keep-empty",
        action="store_true",
        help="record empty documents as Megatron does instead of refusing them",
    )
    r.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="accepted for compatibility (the progress bar updates continuously)",
    )
    r.add_argument("--dataset-impl", default="mmap", choices=("mmap",), help="accepted for compatibility")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def options(a: argparse.Namespace):
    from tools.preprocess.pipeline import Options

    if a.pack and not a.seq_length:
        raise SystemExit("--pack needs --seq-length")
    if a.neat_pack and not a.pack:
        raise SystemExit("--neat-pack needs --pack")
    return Options(
        input=a.input,
        output_prefix=a.output_prefix,
        json_keys=tuple(a.json_keys),
        tokenizer_type=a.tokenizer_type,
        tokenizer_name_or_path=a.tokenizer_name_or_path,
        vocab_file=a.vocab_file,
        merge_file=a.merge_file,
        append_eod=a.append_eod,
        add_bos=a.add_bos,
        split_sentences=a.split_sentences,
        keep_newlines=a.keep_newlines,
        workers=max(1, a.workers),
        partitions=max(1, a.partitions),
        handler_name=a.handler_name,
        seq_length=a.seq_length,
        pack=a.pack,
        neat_pack=a.neat_pack,
        prompt_type=a.prompt_type,
        map_keys=a.map_keys,
        skip_bad=a.skip_bad,
        keep_empty=a.keep_empty,
        max_documents=a.max_documents,
    )


def run(a: argparse.Namespace) -> int:
    from tools.preprocess.pipeline import run as run_pipeline
    from tools.preprocess.readers import InputError, list_inputs

    o = options(a)
    t0 = time.perf_counter()
    try:
        total = sum(f.stat().st_size for f in list_inputs(o.input))
    except (InputError, FileNotFoundError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    bar = None
    if not a.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocessing", leave=False)

    def progress(nbytes: int, docs: int) -> None:
        if bar is not None:
            bar.n = min(nbytes, total)
            dt = max(time.perf_counter() - t0, 1e-6)
            bar.set_postfix_str(f"{docs / dt:,.0f} docs/s {nbytes / dt / 1e6:.1f} MB/s", refresh=False)
            bar.refresh()

    try:
        s = run_pipeline(o, progress)
    except InputError as e:
        print(f"preprocess: error: {e} (use --skip-bad to skip such records)", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    skipped = ", ".join(f"{n} {k}" for k, n in sorted(s.skipped.items())) or "none"
    rows = [
        ("documents", f"{s.documents:,}"),
        ("sequences", f"{s.sequences:,}"),
        ("tokens", f"{s.tokens:,}"),
        ("dtype", s.dtype),
        ("input", f"{s.input_bytes / 1e6:.1f} MB"),
        ("output", f"{s.output_bytes / 1e6:.1f} MB"),
        (
            "time",
            f"{s.seconds:.2f} s ({s.input_bytes / 1e6 / max(s.seconds, 1e-9):.2f} MB/s, "
            f"{s.documents / max(s.seconds, 1e-9):,.0f} docs/s)",
        ),
        ("skipped", skipped),
    ]
    if s.first_error:
        rows.append(("first skipped", s.first_error))
    rows += [("output", f"{name}.{{bin,idx}}") for name in s.outputs]
    for k, v in rows:
        print(f"{k:<14} {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="preprocess_data.py", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preprocess", help="build Megatron .bin/.idx datasets from raw corpora", description=DESCRIPTION
    )
    add_arguments(p)
    p.set_defaults(func=run)
