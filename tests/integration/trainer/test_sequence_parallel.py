"""Sequence parallelism trains like no parallelism: TP=2 + SP and TP=1 on the same data, same init.

The ranks run under torchrun (the launcher does not matter here; Ray is covered elsewhere). The norm
weights' gradients are partial sums on each TP rank under SP; were they not all-reduced over the TP
group, the grad norm (and from step 2 the loss) would differ.
"""

from __future__ import annotations

import json

import pytest

from services.trainer.spec import spec_from_dict, validate
from services.trainer.torchrun import run_local
from tests.fixtures.training import spec_doc

STEPS = 4


def train(assets, save_dir, parallel) -> list[dict]:
    spec = spec_from_dict(spec_doc(assets, save_dir, parallel=parallel,
                                   training={"train_iters": STEPS, "global_batch_size": 4},
                                   checkpoint={"save_dir": str(save_dir), "save_interval": 0}))
    validate(spec)
    r = run_local(spec, spec.world_size, timeout_s=300)
    assert r.returncode == 0, r.log[-4000:]
    rows = [json.loads(x) for x in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in rows if not x.get("done")]


def test_tp2_with_sequence_parallel_matches_tp1(train_assets, tmp_path):
    one = train(train_assets, tmp_path / "tp1", {"tensor_parallel": 1})
    sp = train(train_assets, tmp_path / "tp2sp", {"tensor_parallel": 2, "sequence_parallel": True})
    assert [x["step"] for x in one] == [x["step"] for x in sp] == list(range(1, STEPS + 1))
    for a, b in zip(one, sp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
    assert one[-1]["loss"] != one[0]["loss"]  # the steps did update the weights
