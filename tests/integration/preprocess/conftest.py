import json
from pathlib import Path

import pytest

from shared.paths import ASSETS_DIR
from tests.fixtures.tiny import corpus_lines

GPT2 = {
    "tokenizer_type": "GPT2BPETokenizer",
    "vocab_file": ASSETS_DIR / "gpt2-bpe" / "vocab.json",
    "merge_file": ASSETS_DIR / "gpt2-bpe" / "merges.txt",
}


@pytest.fixture(scope="session")
def texts() -> list[str]:
    lines = corpus_lines(400)
    # the edge cases Megatron's tokenizer path must agree on
    return lines + [
        "Caf\u00e9 \u2014 na\u00efve r\u00e9sum\u00e9 \U0001f600 \u4e2d\u6587",
        "a<|endoftext|>b",
        "  leading spaces\n\nand blank lines  ",
    ]


@pytest.fixture(scope="session")
def jsonl(tmp_path_factory, texts) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "title": f"doc {i}"}) + "\n")
    return path
