"""Bad records: file:line messages, --skip-bad counts them, nothing is silently dropped, no partial output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llm.indexed_dataset import IndexedDatasetReader, data_path, index_path
from shared.paths import REPO_ROOT
from tests.integration.preprocess.conftest import GPT2
from tools.preprocess.pipeline import Options, run
from tools.preprocess.readers import InputError

GOOD = json.dumps({"text": "fine document"})


def corpus(tmp_path, lines: list[bytes], name="in.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"\n".join(lines) + b"\n")
    return p


@pytest.mark.parametrize(
    "bad,kind,message",
    [
        (
            b'{"text": "unterminated',
            "json",
            "in.jsonl:2: malformed JSON (Invalid control character at column 23)",
        ),
        (b'{"title": "no text"}', "missing_key", "in.jsonl:2: missing key 'text' (keys: title)"),
        (b'{"text": 42}', "type", "in.jsonl:2: 'text' is int, expected a string"),
        (
            b'{"text": ""}',
            "empty",
            "in.jsonl:2: empty document for key 'text' (--keep-empty records it as Megatron does)",
        ),
        (b'{"text": "caf\xe9"}', "encoding", "in.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14)"),
        (b"[1, 2]", "json", "in.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_bad_record_stops_with_its_position_or_is_counted(tmp_path, bad, kind, message):
    src = corpus(tmp_path, [GOOD.encode(), bad, GOOD.encode()])
    with pytest.raises(InputError) as e:
        run(Options(input=src, output_prefix=str(tmp_path / "out"), **GPT2))
    assert (
        str(e.value).endswith(message.split(": ", 1)[1])
        and str(e.value).startswith(str(src))
        and e.value.kind == kind
    )
    assert (
        not data_path(tmp_path / "out_text_document").exists()
        and not index_path(tmp_path / "out_text_document").exists()
    )
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]
    s = run(Options(input=src, output_prefix=str(tmp_path / "out"), skip_bad=True, **GPT2))
    assert s.documents == 2 and s.skipped == {kind: 1} and s.first_error.startswith(f"{src}:2: ")
    assert len(IndexedDatasetReader(tmp_path / "out_text_document")) == 2


def test_keep_empty_records_an_empty_document_like_megatron(tmp_path):
    src = corpus(tmp_path, [GOOD.encode(), b'{"text": ""}', GOOD.encode()])
    s = run(Options(input=src, output_prefix=str(tmp_path / "out"), keep_empty=True, append_eod=True, **GPT2))
    r = IndexedDatasetReader(tmp_path / "out_text_document")
    assert s.documents == 3 and r.document_indices.tolist() == [0, 1, 1, 2]


def test_unknown_extension_is_refused(tmp_path):
    (tmp_path / "data.xml").write_text("<doc/>")
    with pytest.raises(InputError, match=r"data.xml: unsupported input type '.xml' \(supported: .jsonl"):
        run(Options(input=tmp_path / "data.xml", output_prefix=str(tmp_path / "out"), **GPT2))


def test_interrupted_run_leaves_no_pair(tmp_path, jsonl, monkeypatch):
    import llm.indexed_dataset as ids

    big = tmp_path / "big" / "in.jsonl"
    big.parent.mkdir()
    big.write_text(jsonl.read_text() * 5)  # several batches

    calls = {"n": 0}
    real = ids.IndexedDatasetWriter.add_flat

    def interrupted(self, tokens, lengths):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, tokens, lengths)

    monkeypatch.setattr(ids.IndexedDatasetWriter, "add_flat", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(Options(input=big, output_prefix=str(tmp_path / "out"), **GPT2))
    assert calls["n"] == 2 and [p.name for p in tmp_path.iterdir()] == ["big"]


def test_script_and_megastack_command_take_the_same_flags(tmp_path, jsonl):
    flags = [
        "--input",
        str(jsonl),
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        str(GPT2["vocab_file"]),
        "--merge-file",
        str(GPT2["merge_file"]),
        "--append-eod",
        "--workers",
        "2",
        "--no-progress",
    ]
    a = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", *flags, "--output-prefix", str(tmp_path / "a")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    b = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.cli.main",
            "preprocess",
            *flags,
            "--output-prefix",
            str(tmp_path / "b"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "documents" in a.stdout and "MB/s" in a.stdout
    assert (
        data_path(tmp_path / "a_text_document").read_bytes()
        == data_path(tmp_path / "b_text_document").read_bytes()
    )
    bad = subprocess.run(
        [
            sys.executable,
            "tools/preprocess_data.py",
            *flags[2:],
            "--input",
            str(tmp_path / "none.jsonl"),
            "--output-prefix",
            str(tmp_path / "c"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == f"preprocess: error: input {tmp_path / 'none.jsonl'} does not exist"
    )
    inspect = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.cli.main",
            "dataset",
            "inspect",
            str(tmp_path / "a_text_document"),
            "--sample",
            "0",
            "--vocab-file",
            str(GPT2["vocab_file"]),
            "--merge-file",
            str(GPT2["merge_file"]),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert (
        inspect.returncode == 0
        and "dtype       uint16" in inspect.stdout
        and "<|endoftext|>'" in inspect.stdout
    )
    verify = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "dataset", "verify", str(tmp_path / "a_text_document")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and verify.stdout.strip().endswith("ok")
