"""Alpaca and ShareGPT SFT: prompt-masked labels, multi-turn, packing, the Alpaca prompt without a
template."""

from __future__ import annotations

import json

import numpy as np

from llm.indexed_dataset import IndexedDatasetReader
from llm.tokenizers import FastTokenizer
from tests.integration.preprocess.conftest import GPT2
from tools.preprocess.handlers import IGNORE
from tools.preprocess.pipeline import Options, run


def write(tmp_path, rows, name="sft.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def datasets(prefix):
    return [
        IndexedDatasetReader(f"{prefix}_packed_{k}_document")
        for k in ("input_ids", "attention_mask", "labels")
    ]


def trained_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_alpaca_with_chat_template_masks_the_prompt(tmp_path, tiny_models):
    tok_dir = tiny_models["llama"]
    rows = [
        {"instruction": "Name the capital.", "input": "France", "output": "Paris is the capital."},
        {"instruction": "Say hi", "input": "", "output": "hi", "history": [["first?", "first answer"]]},
    ]
    s = run(
        Options(
            input=write(tmp_path, rows),
            output_prefix=str(tmp_path / "sft"),
            tokenizer_name_or_path=tok_dir,
            handler_name="AlpacaStyleInstructionHandler",
        )
    )
    ids, mask, labels = datasets(tmp_path / "sft")
    tok = FastTokenizer.from_dir(tok_dir)
    assert s.documents == 2 and ids.dtype == np.int32 and len(ids) == 2
    assert trained_text(tok, ids[0], labels[0]) == "Paris is the capital.<|im_end|>\n"
    assert "user\nName the capital.\nFrance" in tok.decode(ids[0].tolist())
    assert (
        trained_text(tok, ids[1], labels[1]) == "first answer<|im_end|>\nhi<|im_end|>\n"
    )  # every assistant turn
    assert (mask[0] == 1).all() and len(labels[0]) == len(ids[0])


def test_sharegpt_multiturn_and_packing(tmp_path, tiny_models):
    tok_dir = tiny_models["qwen2"]

    def conv(n):
        turns = [{"from": "system", "value": "be brief"}]
        for i in range(n):
            turns += [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": f"answer {i}"}]
        return {"conversations": turns}

    src = write(tmp_path, [conv(1), conv(2), conv(1), conv(3)])
    s = run(
        Options(
            input=src,
            output_prefix=str(tmp_path / "p"),
            tokenizer_name_or_path=tok_dir,
            seq_length=128,
            handler_name="SharegptStyleInstructionHandler",
            pack=True,
            neat_pack=True,
        )
    )
    ids, mask, labels = datasets(tmp_path / "p")
    assert all(len(ids[i]) == 128 for i in range(len(ids))) and s.documents == len(ids) < 4
    tok = FastTokenizer.from_dir(tok_dir)
    text = "".join(trained_text(tok, ids[i], labels[i]) for i in range(len(ids)))
    assert text.count("answer") == 7 and "question" not in text and "be brief" not in text
    assert set(np.unique(mask[0])) >= {0, 1, 2} and (labels[0][mask[0] == 0] == IGNORE).all()


def test_openai_style_keys_and_too_long_samples(tmp_path, tiny_models):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "x " * 300}, {"role": "assistant", "content": "y"}]},
    ]
    keys = {
        "messages": "messages",
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
        },
    }
    s = run(
        Options(
            input=write(tmp_path, rows),
            output_prefix=str(tmp_path / "o"),
            tokenizer_name_or_path=tiny_models["llama"],
            handler_name="SharegptStyleInstructionHandler",
            map_keys=keys,
            seq_length=100,
            skip_bad=True,
        )
    )
    assert s.documents == 1 and s.skipped == {"too_long": 1}


def test_alpaca_prompt_for_tokenizers_without_a_template(tmp_path):
    rows = [{"instruction": "Add 2 and 2.", "output": "4"}]
    run(
        Options(input=write(tmp_path, rows), output_prefix=str(tmp_path / "g"), handler_name="alpaca", **GPT2)
    )
    ids, _, labels = datasets(tmp_path / "g")
    tok = FastTokenizer.gpt2_bpe(GPT2["vocab_file"], GPT2["merge_file"])
    assert tok.decode(ids[0].tolist()).startswith(
        "Below is an instruction"
    ) and "### Response:\n4<|endoftext|>" in tok.decode(ids[0].tolist())
    assert trained_text(tok, ids[0], labels[0]) == "4<|endoftext|>"
