"""SFT samples: validation held out of training (or its own sets), blend weights honoured, a seeded shuffle
per epoch, and the same order after a resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from services.trainer.data import SFTOrder, batches, build_datasets
from services.trainer.datafiles import split_documents
from services.trainer.spec import validate
from services.trainer.wire import spec_from_dict


def test_the_held_out_part_is_never_trained_on_and_each_epoch_covers_the_train_part_once():
    n, total = 200, 3 * 180
    train = SFTOrder([n], [1.0], total, seed=7, split="90,10,0", part=0)
    valid = SFTOrder([n], [1.0], 40, seed=7, split="90,10,0", part=1)
    t_ids = [train[i][1] for i in range(total)]
    v_ids = {valid[i][1] for i in range(40)}
    assert split_documents("90,10,0", n) == [180, 20, 0]
    assert not set(t_ids) & v_ids and v_ids == set(range(180, 200))
    epochs = [t_ids[k * 180 : (k + 1) * 180] for k in range(3)]
    assert all(sorted(e) == list(range(180)) for e in epochs)  # every train sample once per epoch
    assert epochs[0] != epochs[1] and epochs[0] != list(range(180))  # shuffled, afresh each epoch


def test_blend_weights_are_followed_at_every_point():
    order = SFTOrder([50, 50, 50], [3.0, 1.0, 0.0001], 4000, seed=1)
    ds = [order[i][0] for i in range(4000)]
    for upto in (4, 40, 400, 4000):
        c = Counter(ds[:upto])
        assert abs(c[0] - 0.75 * upto) <= 1.5 and abs(c[1] - 0.25 * upto) <= 1.5, (upto, c)


def test_the_order_is_deterministic_and_seeded():
    a = SFTOrder([30, 20], [1.0, 1.0], 100, seed=5)
    b = SFTOrder([30, 20], [1.0, 1.0], 100, seed=5)
    c = SFTOrder([30, 20], [1.0, 1.0], 100, seed=6)
    assert [a[i] for i in range(100)] == [b[i] for i in range(100)] != [c[i] for i in range(100)]


@pytest.fixture(scope="module")
def sft_data(tiny_models, tmp_path_factory):
    from tests.fixtures.training import sft_prefix

    root = tmp_path_factory.mktemp("sft")
    rows = [{"instruction": f"Repeat {i}", "input": "", "output": f"{i} {i}"} for i in range(60)]
    sft_prefix(root, "a", rows, tiny_models["llama"])
    sft_prefix(root, "v", rows[:10], tiny_models["llama"])
    return root


def _spec(train_assets, sft_data, tmp_path, **data):
    from tests.fixtures.training import spec_doc

    doc = spec_doc(
        train_assets,
        tmp_path / "run",
        kind="sft",
        data={"paths": [{"prefix": str(sft_data / "a")}], "split": "80,20,0", **data},
        parallel={"tensor_parallel": 1},
        training={"train_iters": 10, "global_batch_size": 4, "eval_interval": 5, "eval_iters": 2},
    )
    spec = spec_from_dict(doc)
    validate(spec)
    return spec


def test_sft_validation_is_held_out_of_training_or_its_own_set(train_assets, sft_data, tmp_path):
    spec = _spec(train_assets, sft_data, tmp_path)
    train, valid = build_datasets(spec, train_assets["hf"], 0)
    trained = {train.index[i][1] for i in range(len(train))}
    validated = {valid.index[i][1] for i in range(len(valid))}
    assert trained and validated and not trained & validated  # never trained on
    own = _spec(train_assets, sft_data, tmp_path, valid_paths=[{"prefix": str(sft_data / "v")}])
    train, valid = build_datasets(own, train_assets["hf"], 0)
    trained = {train.index[i][1] for i in range(len(train))}  # 40 draws from all 60 (no part held out)
    assert len(trained) == 40 and max(trained) >= 48
    assert (
        valid.triples[0][0] is not train.triples[0][0]
        and len({valid.index[i][1] for i in range(len(valid))}) <= 10
    )


def test_a_resumed_job_reads_the_samples_an_uninterrupted_one_reads(train_assets, sft_data, tmp_path):
    spec = _spec(train_assets, sft_data, tmp_path)
    train, _ = build_datasets(spec, train_assets["hf"], 0)
    whole = [
        b["tokens"] for b in batches(train, consumed=0, micro_batch_size=2, dp_rank=0, dp_size=1, total=40)
    ]
    again, _ = build_datasets(spec, train_assets["hf"], 0)  # a new process, after a kill at sample 16
    resumed = [
        b["tokens"] for b in batches(again, consumed=16, micro_batch_size=2, dp_rank=0, dp_size=1, total=40)
    ]
    assert len(resumed) == len(whole) - 8 and all(np.array_equal(x, y) for x, y in zip(whole[8:], resumed))
