"""megatron-core reads our output exactly, GPTDataset builds samples, and the bytes equal Megatron's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llm.indexed_dataset import data_path, index_path
from tests.integration.preprocess.conftest import GPT2
from tools.preprocess.pipeline import Options, run


def megatron_reference(texts: list, prefix, vocab_file, merge_file) -> None:
    """Megatron-LM tools/preprocess_data.py's encode loop (main), on megatron-core's own builder and
    the tokenizer its GPT2BPETokenizer uses (transformers' GPT-2 tokenizer from vocab + merges)."""
    import shutil
    import tempfile

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from transformers import GPT2TokenizerFast

    d = tempfile.mkdtemp()
    shutil.copy(vocab_file, f"{d}/vocab.json")
    shutil.copy(merge_file, f"{d}/merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(d)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(tok.vocab_size))
    for text in texts:
        sentences = text if isinstance(text, list) else [text]
        doc_ids, lens = [], []
        for s in sentences:
            ids = tok(s).input_ids
            if len(ids) > 0:
                doc_ids.extend(ids)
                lens.append(len(ids))
        if len(doc_ids) > 0:
            doc_ids.append(tok.eos_token_id)  # --append-eod: EOD on the last sentence
            lens[-1] += 1
        builder.add_document(torch.tensor(doc_ids, dtype=torch.long), lens)
    builder.finalize(f"{prefix}.idx")


def test_bytes_identical_to_megatrons_preprocess(tmp_path, jsonl, texts):
    extra = tmp_path / "lists.jsonl"
    docs = texts + [["First sentence.", "Second one!"]]
    with open(extra, "w") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")
    s = run(Options(input=extra, output_prefix=str(tmp_path / "ours"), append_eod=True, **GPT2))
    megatron_reference(docs, tmp_path / "ref", GPT2["vocab_file"], GPT2["merge_file"])
    assert s.dtype == "uint16"
    assert data_path(tmp_path / "ours_text_document").read_bytes() == data_path(tmp_path / "ref").read_bytes()
    assert (
        index_path(tmp_path / "ours_text_document").read_bytes() == index_path(tmp_path / "ref").read_bytes()
    )


def test_megatron_indexed_dataset_reads_exactly_what_we_wrote(tmp_path, jsonl, tiny_models):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from llm.tokenizers import FastTokenizer

    tok_dir = tiny_models["llama"]
    run(
        Options(
            input=jsonl,
            output_prefix=str(tmp_path / "ds"),
            tokenizer_name_or_path=tok_dir,
            append_eod=True,
            split_sentences=True,
            json_keys=("text", "title"),
        )
    )
    tok = FastTokenizer.from_dir(tok_dir)
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    ds = IndexedDataset(str(tmp_path / "ds_title_sentence"))
    assert len(ds) == len(lines)
    for i in (0, 7, len(lines) - 1):
        assert ds[i].tolist() == tok.encode(lines[i]["title"]) + [tok.eod_id]
    text = IndexedDataset(str(tmp_path / "ds_text_sentence"))
    assert text.document_indices[-1] == len(text) and len(text.document_indices) == len(lines) + 1
    doc0 = [text[j].tolist() for j in range(text.document_indices[0], text.document_indices[1])]
    assert sum(doc0, []) == sum(
        (
            tok.encode(s)
            for s in __import__("tools.preprocess.handlers", fromlist=["x"]).split_sentences(
                lines[0]["text"], False
            )
        ),
        [],
    ) + [tok.eod_id]


def test_gpt_dataset_builds_samples(tmp_path, jsonl, tiny_models):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizer

    from llm.mcore import dist as mdist

    mdist.init()  # the builder synchronises ranks, even a world of one
    run(
        Options(
            input=jsonl,
            output_prefix=str(tmp_path / "ds"),
            tokenizer_name_or_path=tiny_models["qwen2"],
            append_eod=True,
        )
    )
    prefix = str(tmp_path / "ds_text_document")
    cfg = GPTDatasetConfig(
        random_seed=1,
        sequence_length=32,
        blend=([prefix, prefix], [0.7, 0.3]),
        split="90,5,5",
        path_to_cache=str(tmp_path / "cache"),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        tokenizer=MegatronTokenizer.from_pretrained(
            str(tiny_models["qwen2"]), metadata_path={"library": "huggingface"}
        ),
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [64, 8, 8], lambda: True, cfg).build()
    sample = train[0]
    assert len(train) >= 64 and sample["tokens"].shape == (32,)  # blending rounds up
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])


@pytest.mark.parametrize("fmt", ["json", "jsonl.gz", "jsonl.zst", "parquet", "arrow", "csv", "txt", "folder"])
def test_every_input_format_gives_the_same_tokens(tmp_path, jsonl, texts, fmt):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    flat = [r for r in rows if "\n" not in r["text"]]  # one line per document for .txt
    use = flat if fmt == "txt" else rows
    src = tmp_path / f"in.{fmt}"
    if fmt == "json":
        src.write_text(json.dumps(use))
    elif fmt == "jsonl.gz":
        src.write_bytes(gzip.compress(jsonl.read_bytes()))
    elif fmt == "jsonl.zst":
        src.write_bytes(zstandard.ZstdCompressor().compress(jsonl.read_bytes()))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(use), src, row_group_size=50)
    elif fmt == "arrow":
        table = pa.Table.from_pylist(use)
        with pa.ipc.new_stream(str(src), table.schema) as w:
            w.write_table(table, max_chunksize=64)
    elif fmt == "csv":
        import csv

        with open(src, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["text", "title"])
            wr.writeheader()
            wr.writerows(use)
    elif fmt == "txt":
        src.write_text("".join(r["text"] + "\n" for r in use))
    else:
        src.mkdir()
        half = len(rows) // 2
        (src / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:half]))
        (src / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[half:]))
    run(Options(input=src, output_prefix=str(tmp_path / "got"), append_eod=True, **GPT2))
    ref_src = tmp_path / "ref.jsonl"
    ref_src.write_text("".join(json.dumps(r) + "\n" for r in use))
    run(Options(input=ref_src, output_prefix=str(tmp_path / "ref"), append_eod=True, **GPT2))
    assert (
        data_path(tmp_path / "got_text_document").read_bytes()
        == data_path(tmp_path / "ref_text_document").read_bytes()
    )
    assert (
        index_path(tmp_path / "got_text_document").read_bytes()
        == index_path(tmp_path / "ref_text_document").read_bytes()
    )


def test_partitions_merge_to_the_same_dataset(tmp_path, jsonl):
    one = run(Options(input=jsonl, output_prefix=str(tmp_path / "one"), append_eod=True, **GPT2))
    three = run(
        Options(
            input=jsonl,
            output_prefix=str(tmp_path / "three"),
            append_eod=True,
            partitions=3,
            workers=2,
            **GPT2,
        )
    )
    assert one.documents == three.documents and one.tokens == three.tokens
    for ext in (data_path, index_path):
        assert (
            ext(tmp_path / "one_text_document").read_bytes()
            == ext(tmp_path / "three_text_document").read_bytes()
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one_text_document.bin",
        "one_text_document.idx",
        "three_text_document.bin",
        "three_text_document.idx",
    ]
    assert np.dtype("uint16").name == one.dtype
