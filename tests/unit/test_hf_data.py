"""The data side of hf-deepspeed jobs: records, prompt masking, the loss by hand, batch order, LR schedule."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llm.sft_records import IGNORE, InputError, RecordEncoder, read_records
from services.trainer.hf_data import Samples, lr_factor, masked_loss, steps_per_epoch, total_steps

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there, friend."}]},
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    from llm.tokenizers import FastTokenizer

    return FastTokenizer.from_dir(tiny_tokenizer)


def test_json_and_jsonl_records_and_their_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert [d for _, d in read_records(tmp_path / "a.json")] == RECORDS
    got = read_records(tmp_path / "b.jsonl")
    assert [d for _, d in got] == RECORDS and got[1][0].endswith("b.jsonl:2")
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: not JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(InputError, match="one array of objects"):
        read_records(tmp_path / "obj.json")
    (tmp_path / "c.csv").write_text("x\n")
    with pytest.raises(InputError, match=".json or .jsonl"):
        read_records(tmp_path / "c.csv")


def test_only_the_answer_is_labelled(tok):
    enc = RecordEncoder(tok)
    for doc, answer in ((RECORDS[0], "Blue."), (RECORDS[1], "Hi there, friend.")):
        ids, labels = enc.encode(doc, "here")
        assert len(ids) == len(labels)
        kept = [t for t in labels if t != IGNORE]
        assert kept and kept == ids[len(ids) - len(kept) - _tail(labels) : len(ids) - _tail(labels)]
        assert answer in tok.raw.decode(kept, skip_special_tokens=False)
        prompt = tok.raw.decode(
            [i for i, lab in zip(ids, labels) if lab == IGNORE], skip_special_tokens=False
        )
        assert answer not in prompt and ("colour" in prompt or "Say hi" in prompt)
    with pytest.raises(InputError, match="missing key 'output'"):
        enc.check({"instruction": "x"}, "r1")


def _tail(labels) -> int:
    """Unlabelled positions after the last labelled one (the template's trailing newline)."""
    n = 0
    for t in reversed(labels):
        if t != IGNORE:
            return n
        n += 1
    return n


def test_masked_loss_equals_a_hand_computation_on_two_samples(tok):
    enc = RecordEncoder(tok)
    pairs = [enc.encode(d, "r") for d in RECORDS]
    samples = Samples([p[0] for p in pairs], [p[1] for p in pairs], pad_id=0)
    batch = samples.collate([0, 1])
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, 97)
    labels = batch["labels"].clamp(max=96).where(batch["labels"] != IGNORE, IGNORE)
    total, count = 0.0, 0
    for row in range(2):
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target == IGNORE:
                continue
            total += -(logits[row, t].double().log_softmax(-1)[target]).item()
            count += 1
    assert count == sum(1 for p in pairs for x in p[1][1:] if x != IGNORE)
    assert masked_loss(logits, labels).item() == pytest.approx(total / count, rel=1e-6)
    # padding is masked from attention and from the loss
    short = int(batch["attention_mask"].sum(1).min())
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all() and short < batch[
        "input_ids"
    ].shape[1]


def test_each_epoch_visits_every_sample_once_split_over_ranks():
    n, gbs, mbs, world = 21, 8, 2, 2
    samples = Samples([[i + 1] for i in range(n)], [[i + 1] for i in range(n)], pad_id=0)
    assert steps_per_epoch(n, gbs) == 2 and total_steps(0, 3, n, gbs) == 6 and total_steps(5, 0, n, gbs) == 5
    seen = []
    for step in range(2):
        per_rank = [
            samples.micro_batches(
                step, seed=7, global_batch_size=gbs, micro_batch_size=mbs, rank=r, world=world
            )
            for r in range(world)
        ]
        assert all(len(mbs_) == gbs // (mbs * world) for mbs_ in per_rank)  # gradient accumulation 2
        seen += [int(x) for mbs_ in per_rank for b in mbs_ for x in b["input_ids"].flatten()]
    assert len(seen) == len(set(seen)) == 16  # no sample twice in an epoch; the last partial batch dropped
    # the order is a function of (seed, epoch): a resumed job reads what an uninterrupted one reads
    again = samples.micro_batches(1, seed=7, global_batch_size=gbs, micro_batch_size=mbs, rank=1, world=world)
    first = samples.micro_batches(1, seed=7, global_batch_size=gbs, micro_batch_size=mbs, rank=1, world=world)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, first))
    assert samples.order(7, 0) != samples.order(7, 1)


def test_lr_schedule_warms_up_then_decays_to_min():
    kw = {"warmup": 4, "decay_steps": 20, "min_ratio": 0.1}
    assert [lr_factor(s, style="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, style="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(12, style="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(20, style="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(99, style="linear", **kw) == pytest.approx(0.1)
    assert lr_factor(12, style="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(15, style="constant", **kw) == 1.0
