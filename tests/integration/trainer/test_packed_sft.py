"""Neat-packed SFT samples are kept apart: each sample's per-token losses inside a pack equal its losses
alone.

The pack and the samples come from `megastack preprocess` (--pack --neat-pack, and unpacked), are read by the
trainer's SFTDataset and run through the trainer's forward step on a megatron-core GPTModel (fp32, local spec)
in a separate process (tests/helpers/packed_losses.py). The same pack with isolation switched off must differ,
so the comparison can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from shared.paths import REPO_ROOT

SEQ = 128
ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue, like the sky at noon."},
    {"instruction": "Count to five.", "input": "", "output": "one two three four five"},
    {"instruction": "Say hello", "input": "politely", "output": "Good morning to you."},
]


@pytest.fixture(scope="module")
def packed_data(tiny_models, tmp_path_factory):
    from tests.fixtures.training import sft_prefix

    root = tmp_path_factory.mktemp("packed")
    sft_prefix(root, "neat", ROWS, tiny_models["llama"], seq_length=SEQ, pack=True, neat_pack=True)
    sft_prefix(root, "plain", ROWS, tiny_models["llama"], seq_length=SEQ, pack=True)
    sft_prefix(root, "single", ROWS, tiny_models["llama"], seq_length=SEQ)
    return root


def test_a_neat_pack_of_three_samples_computes_what_each_computes_alone(packed_data, tiny_models):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "helpers" / "packed_losses.py"),
            "--arch",
            str(tiny_models["llama"]),
            "--packed",
            str(packed_data / "neat"),
            "--single",
            str(packed_data / "single"),
            "--seq-length",
            str(SEQ),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["samples_in_pack"] == 3 and len(report["samples"]) == 3
    assert sorted(s["segment"] for s in report["samples"]) == [1, 2, 3]
    for s in report["samples"]:
        assert s["scored"] > 0
        assert s["max_rel_diff"] <= 1e-5, report
    # without isolation the 2nd and 3rd samples see the ones before them (and sit at later positions)
    later = [s for s in report["samples"] if s["segment"] > 1]
    assert all(s["leaky_max_rel_diff"] > 1e-3 for s in later), report


def test_the_dataset_restarts_positions_and_never_scores_across_samples(packed_data, tiny_models):
    from services.trainer.data import SFTDataset
    from services.trainer.datafiles import neat_packed

    assert neat_packed([str(packed_data / "neat")]) and not neat_packed([str(packed_data / "plain")])
    item = SFTDataset([str(packed_data / "neat")], SEQ, 0)[0]
    segs, pos, mask = item["segment_ids"].numpy(), item["position_ids"].numpy(), item["loss_mask"].numpy()
    starts = [0] + [i for i in range(1, SEQ) if segs[i] != segs[i - 1] and segs[i] != 0]
    assert len(starts) == 3 and all(pos[s] == 0 for s in starts)
    for a, b in zip(starts, starts[1:] + [int((segs > 0).sum())]):
        assert list(pos[a:b]) == list(range(b - a))
        assert mask[b - 1] == 0  # a sample's last token does not learn the next sample's first
    assert np.all(mask[segs == 0] == 0)
    plain = SFTDataset([str(packed_data / "plain")], SEQ, 0)[0]  # ModelLink's plain packing: one sequence
    n = int((plain["segment_ids"] > 0).sum())
    assert list(plain["position_ids"][:n]) == list(range(n))


def test_transformer_engine_is_refused_at_submit_for_neat_packs(packed_data, train_assets, tmp_path):
    from services.trainer.spec import validate
    from services.trainer.wire import spec_from_dict
    from shared.errors import InvalidArgument
    from tests.fixtures.training import spec_doc

    doc = spec_doc(
        train_assets,
        tmp_path / "run",
        kind="sft",
        data={"paths": [{"prefix": str(packed_data / "neat"), "weight": 1.0}], "seq_length": SEQ},
    )
    doc["training"]["transformer_impl"] = "transformer_engine"
    with pytest.raises(InvalidArgument) as e:
        validate(spec_from_dict(doc))
    assert e.value.field == "training.transformer_impl"


@pytest.fixture(scope="module")
def neat_corpus(tiny_models, tmp_path_factory):
    from tests.fixtures.training import sft_prefix

    rows = [
        {"instruction": f"Repeat the number {i} twice.", "input": "", "output": f"{i} {i}"} for i in range(40)
    ]
    return sft_prefix(
        tmp_path_factory.mktemp("neat-corpus"),
        "neat",
        rows,
        tiny_models["llama"],
        seq_length=SEQ,
        pack=True,
        neat_pack=True,
    )


def _train_neat(assets, corpus, save_dir, parallel) -> list[dict]:
    from services.trainer.spec import validate
    from services.trainer.torchrun import run_local
    from services.trainer.wire import spec_from_dict
    from tests.fixtures.training import spec_doc

    spec = spec_from_dict(
        spec_doc(
            assets,
            save_dir,
            kind="sft",
            parallel=parallel,
            data={"paths": [{"prefix": str(corpus), "weight": 1.0}], "seq_length": SEQ},
            training={"train_iters": 4, "global_batch_size": 4, "micro_batch_size": 2},
            checkpoint={"save_dir": str(save_dir), "save_interval": 0},
        )
    )
    validate(spec)
    r = run_local(spec, spec.world_size, timeout_s=300)
    assert r.returncode == 0, r.log[-4000:]
    assert "kept apart by an explicit mask" in r.log
    return [
        json.loads(x)
        for x in (save_dir / "metrics.jsonl").read_text().splitlines()
        if not json.loads(x).get("done")
    ]


def test_neat_packs_train_alike_under_tensor_sequence_and_pipeline_parallelism(
    train_assets, neat_corpus, tmp_path
):
    """The mask and the positions reach every TP rank (heads split, SP gathers the sequence) and every
    stage."""
    ref = _train_neat(train_assets, neat_corpus, tmp_path / "ref", {"tensor_parallel": 1})
    assert [x["step"] for x in ref] == [1, 2, 3, 4]
    for name, parallel in (
        ("tp2-sp", {"tensor_parallel": 2, "sequence_parallel": True}),
        ("pp2", {"tensor_parallel": 1, "pipeline_parallel": 2}),
    ):
        got = _train_neat(train_assets, neat_corpus, tmp_path / name, parallel)
        for a, b in zip(ref, got, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (name, a, b)
