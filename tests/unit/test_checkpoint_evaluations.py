"""The pieces of a training run's checkpoint evaluations that need no cluster: which checkpoints are chosen,
which are this job's, the hold that keeps rotation off a checkpoint being exported, converting one chosen
iteration of a save folder, and the spec's checks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from services.trainer.evaluations import chosen, saved_steps
from services.trainer.jobfiles import HOLD_PREFIX
from services.trainer.spec import CheckpointEval, TrainSpec, _check_evaluate
from shared.errors import InvalidArgument, NotFound


def spec(**over) -> TrainSpec:
    base = dict(
        name="t",
        kind="pretrain",
        seq_length=8,
        train_iters=30,
        save_dir="/tmp/x",
        data_paths=(("/d", 1.0),),
        save_interval=5,
        evaluate=CheckpointEval(tasks=("megastack_capitals",), every_n_saves=2),
    )
    return TrainSpec(**{**base, **over})


def test_every_nth_save_and_the_final_step_are_chosen():
    s = spec()
    assert [step for step in range(1, 31) if chosen(s, step)] == [10, 20, 30]
    s = spec(train_iters=27)  # the final checkpoint, off the grid, is always scored
    assert [step for step in range(1, 28) if chosen(s, step)] == [10, 20, 27]
    s = spec(save_interval=0)  # saved only at the end
    assert [step for step in range(1, 31) if chosen(s, step)] == [30]


def test_only_this_jobs_checkpoints_count(tmp_path):
    for step in (5, 10):
        (tmp_path / f"iter_{step:07d}").mkdir()
    (tmp_path / "iter_0000003").mkdir()
    old = time.time() - 3600  # left by an earlier job in the same save folder
    os.utime(tmp_path / "iter_0000003", (old, old))
    (tmp_path / ".tmp-iter_0000015").mkdir()  # a save still being written
    (tmp_path / "iter_0000020").write_text("not a folder")
    assert saved_steps(tmp_path, time.time() - 60) == [5, 10]


def test_rotation_keeps_a_held_checkpoint(tmp_path):
    from services.trainer.checkpointing import _publish

    for step in (5, 10, 15):
        (tmp_path / f".tmp-iter_{step:07d}").mkdir()
    (tmp_path / f"{HOLD_PREFIX}iter_0000005").touch()  # the trainer service is exporting step 5
    _publish(tmp_path, 5, keep_last=1)
    _publish(tmp_path, 10, keep_last=1)
    _publish(tmp_path, 15, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000005", "iter_0000015"]
    (tmp_path / f"{HOLD_PREFIX}iter_0000005").unlink()  # released: the next rotation takes it
    (tmp_path / ".tmp-iter_0000020").mkdir()
    _publish(tmp_path, 20, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000020"]


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(tasks=()), "evaluate.tasks"),
        (dict(tasks=("",)), "evaluate.tasks"),
        (dict(limit=-1), "evaluate.limit"),
        (dict(every_n_saves=-2), "evaluate.every_n_saves"),
        (dict(num_fewshot=-1), "evaluate.num_fewshot"),
    ],
)
def test_a_bad_evaluate_section_names_its_field(bad, field):
    with pytest.raises(InvalidArgument) as e:
        _check_evaluate(CheckpointEval(**{"tasks": ("megastack_capitals",), **bad}))
    assert e.value.field == field


def test_one_iteration_of_a_save_folder_converts_and_the_folder_stays_safe(
    tmp_path, tiny_models, tiny_tokenizer
):
    """Two iterations with different weights in one save folder: load_iteration picks the older one; an export
    beside it in the same folder is allowed, a target over the save folder is not."""
    from llm.checkpoints import open_checkpoint
    from services.converter.conversion import ConvertSpec, convert
    from tools.tiny import make_tiny_hf

    other = make_tiny_hf("llama", tmp_path / "other", tiny_tokenizer, seed=7)
    save = tmp_path / "run"
    convert(ConvertSpec(load_dir=tiny_models["llama"], save_dir=save, target_format="mcore", iteration=5))
    convert(ConvertSpec(load_dir=other, save_dir=tmp_path / "b", target_format="mcore", iteration=10))
    (tmp_path / "b" / "iter_0000010").rename(save / "iter_0000010")
    (save / "latest_checkpointed_iteration.txt").write_text("10")

    out = save / "hf-evaluations" / "iter_0000005"
    convert(ConvertSpec(load_dir=save, save_dir=out, target_format="hf", load_iteration=5))
    first, newest = open_checkpoint(tiny_models["llama"]), open_checkpoint(other)
    got = open_checkpoint(out)
    name = "decoder.layers.0.mlp.linear_fc2.weight"
    assert torch.equal(got.get(name), first.get(name)) and not torch.equal(got.get(name), newest.get(name))

    with pytest.raises(NotFound) as e:
        convert(ConvertSpec(load_dir=save, save_dir=tmp_path / "x", target_format="hf", load_iteration=7))
    assert e.value.field == "load_iteration" and "5, 10" in e.value.message
    before = sorted(str(p.relative_to(save)) for p in save.rglob("*"))
    with pytest.raises(InvalidArgument) as e:  # the save folder holds what the conversion reads
        convert(
            ConvertSpec(load_dir=save, save_dir=save, target_format="hf", load_iteration=5, overwrite=True)
        )
    assert e.value.field == "save_dir"
    assert sorted(str(p.relative_to(save)) for p in save.rglob("*")) == before
    with pytest.raises(InvalidArgument) as e:
        convert(
            ConvertSpec(
                load_dir=tiny_models["llama"], save_dir=tmp_path / "y", target_format="hf", load_iteration=5
            )
        )
    assert e.value.field == "load_iteration"
    assert Path(out / "config.json").is_file()
