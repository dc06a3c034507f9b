"""Asynchronous checkpoints (checkpoint.async_save): written in the background, published only when complete,
loaded by the converter, resumed exactly, and a trainer killed mid-save resumes from the checkpoint before.

One process per run (TP=1; the tiny Llama and data of tests/conftest.py train_assets); the reference is the
same job with synchronous saves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from services.trainer.checkpointing import latest_iteration
from services.trainer.jobfiles import SAVES_FILE
from services.trainer.spec import validate
from services.trainer.torchrun import run_local
from services.trainer.wire import spec_from_dict
from shared.paths import REPO_ROOT
from tests.fixtures.training import curve, spec_doc


def make_spec(assets, save_dir, *, iters: int, async_save: bool):
    spec = spec_from_dict(
        spec_doc(
            assets,
            save_dir,
            parallel={"tensor_parallel": 1},
            training={"train_iters": iters, "global_batch_size": 4},
            optimizer={"lr": 0.002, "lr_warmup_iters": 2, "lr_decay_iters": 6},  # one schedule for 4 and 6
            checkpoint={"save_dir": str(save_dir), "save_interval": 2, "async_save": async_save},
        )
    )
    validate(spec)
    return spec


def train(assets, save_dir, *, iters: int, async_save: bool) -> str:
    r = run_local(make_spec(assets, save_dir, iters=iters, async_save=async_save), 1, timeout_s=300)
    assert r.returncode == 0, r.log[-4000:]
    return r.log


def weights(save_dir):
    from llm.checkpoints import open_checkpoint

    reader = open_checkpoint(save_dir)
    return {name: reader.get(name).float() for name in reader.names()}


@pytest.fixture(scope="module")
def sync_run(train_assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("sync") / "run"
    train(train_assets, d, iters=6, async_save=False)
    return d


def test_async_saves_resume_exactly_and_convert(train_assets, sync_run, tmp_path):
    d = tmp_path / "run"
    log = train(train_assets, d, iters=4, async_save=True)
    assert "written in the background" in log
    saves = [json.loads(x) for x in (d / SAVES_FILE).read_text().splitlines()]
    assert [s["iteration"] for s in saves] == [2, 4] and all(s["async"] for s in saves)
    assert all(
        s["blocked_s"] < s["written_s"] for s in saves
    )  # the step loop went on while the shards were written
    assert latest_iteration(d) == 4 and not list(d.glob(".tmp-*"))
    train(train_assets, d, iters=6, async_save=True)  # resumes from the async checkpoint of step 4
    ref, got = curve(sync_run), curve(d)
    assert sorted(got) == list(range(1, 7)) and all(got[s] == ref[s] for s in range(1, 7)), (ref, got)
    mine, theirs = weights(d), weights(sync_run)
    assert mine.keys() == theirs.keys() and all(float((mine[k] - theirs[k]).abs().max()) == 0.0 for k in mine)
    from services.converter.conversion import ConvertSpec, convert

    result = convert(ConvertSpec(load_dir=d, save_dir=tmp_path / "hf", target_format="hf", verify=True))
    assert result.parity["max_abs_logit_diff"] < 1e-4 and result.parity["weights_exact"]


def test_a_trainer_killed_during_a_background_save_resumes_from_the_one_before(
    train_assets, sync_run, tmp_path
):
    d = tmp_path / "run"
    spec = make_spec(train_assets, d, iters=6, async_save=True)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.to_json())
    r = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "helpers" / "die_during_async_save.py"),
            str(spec_path),
            "4",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == -9, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    assert latest_iteration(d) == 2  # step 4's checkpoint was never published
    assert not (d / "iter_0000004").exists()
    train(train_assets, d, iters=6, async_save=True)
    assert latest_iteration(d) == 6 and not list(d.glob(".tmp-*"))
    ref, got = curve(sync_run), curve(d)  # steps 3-4 ran twice; the last values are the resumed run's
    assert all(got[s] == ref[s] for s in range(1, 7)), (ref, got)


def test_a_killed_sft_job_reads_the_same_samples_as_an_uninterrupted_one(train_assets, tiny_models, tmp_path):
    """Two SFT datasets blended 3:1, shuffled with the job seed: a job SIGKILLed after step 4 and resumed
    from its step-2 checkpoint computes every step's loss bit for bit as the uninterrupted job, so it read the
    same samples in the same order (a different sample changes the loss)."""
    import dataclasses

    from tests.fixtures.training import sft_prefix

    prefixes = [
        sft_prefix(
            tmp_path,
            name,
            [
                {"instruction": f"Say {name} {i}.", "input": "", "output": f"{name} {i} {i * 7}"}
                for i in range(n)
            ],
            tiny_models["llama"],
        )
        for name, n in (("a", 30), ("b", 20))
    ]

    def sft(save_dir):
        s = make_spec(train_assets, save_dir, iters=6, async_save=True)
        return dataclasses.replace(s, kind="sft", data_paths=((prefixes[0], 3.0), (prefixes[1], 1.0)))

    whole = sft(tmp_path / "whole")
    validate(whole)
    r = run_local(whole, 1, timeout_s=300)
    assert r.returncode == 0, r.log[-3000:]
    killed = sft(tmp_path / "killed")
    (tmp_path / "killed.json").write_text(killed.to_json())
    k = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "helpers" / "die_during_async_save.py"),
            str(tmp_path / "killed.json"),
            "4",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert k.returncode == -9, k.stderr[-2000:]
    assert latest_iteration(tmp_path / "killed") == 2
    r = run_local(killed, 1, timeout_s=300)
    assert r.returncode == 0, r.log[-3000:]
    ref, got = curve(tmp_path / "whole"), curve(tmp_path / "killed")
    assert sorted(got) == list(range(1, 7)) and all(got[s] == ref[s] for s in ref), (ref, got)
    assert len(set(ref.values())) == 6  # the steps saw different samples
