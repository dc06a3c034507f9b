"""hf-deepspeed jobs through the trainer service on a real local Ray head: 2 ranks, ZeRO-2, a rank killed
mid-run, the job resumes from DeepSpeed's ``latest`` checkpoint and its loss curve equals an uninterrupted
run's."""

from __future__ import annotations

import json
import os
import signal

import grpc
import pytest

from protos.common.v1 import common_pb2
from protos.trainer.v1 import trainer_pb2 as pb
from services.trainer.wire import spec_from_dict, spec_to_pb
from tests.fixtures.training import curve, hf_ds_doc, wait_for

# 64 records / global batch 8 = 8 steps an epoch: 24 steps; the validation records scored every 8 steps
STEPS = {"train_iters": 0, "epochs": 3, "eval_interval": 8}


def submit(stub, assets, save_dir, **over) -> str:
    doc = hf_ds_doc(
        assets, save_dir, training=STEPS, checkpoint={"save_dir": str(save_dir), "save_interval": 5}
    )
    doc["data"]["valid_files"] = [str(assets["valid"])]
    for section, values in over.items():
        doc[section] = {**doc.get(section, {}), **values}
    return stub.SubmitTrainJob(pb.SubmitTrainJobRequest(spec=spec_to_pb(spec_from_dict(doc)))).job_id


def follow(stub, job_id):
    last = None
    for ev in stub.WatchTrainJob(pb.WatchTrainJobRequest(job_id=job_id), timeout=600):
        last = ev.job
    return last


def log_tail(stub, job_id) -> str:
    """The job's log lines that say why a rank stopped (for failure messages)."""
    lines = [x for r in stub.GetTrainJobLogs(pb.GetTrainJobLogsRequest(job_id=job_id)) for x in r.lines]
    keep = [x for x in lines if "Error" in x or "error" in x or "Traceback" in x or "terminate" in x]
    return "\n".join((keep or lines)[-40:])


@pytest.fixture(scope="module")
def steady(trainer, instruction_assets, tmp_path_factory):
    stub, _, _ = trainer
    d = tmp_path_factory.mktemp("ds-steady") / "run"
    job = follow(stub, submit(stub, instruction_assets, d))
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.error
    return job, curve(d), d


def test_a_job_runs_on_ray_and_reports_like_the_others(steady):
    job, losses, d = steady
    assert job.metrics.step == 24 and job.metrics.last_checkpoint_step == 24 and job.metrics.tokens_per_s > 0
    assert job.status.progress.total == 24  # from the epochs, counted by the job
    assert sorted(losses) == list(range(1, 25))
    assert sum(losses[s] for s in (22, 23, 24)) < sum(losses[s] for s in (1, 2, 3))
    assert (d / "latest").read_text() == "global_step24" and job.spec.kind == pb.TRAIN_JOB_KIND_HF_DEEPSPEED
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    valid = {r["step"]: r["valid_loss"] for r in rows if "valid_loss" in r and not r.get("done")}
    assert sorted(valid) == [8, 16, 24] and valid[24] < valid[8], (
        valid
    )  # held-out records, scored as it learns


def test_a_killed_rank_resumes_from_latest_with_the_same_curve(trainer, instruction_assets, tmp_path, steady):
    stub, _, _ = trainer
    _, ref, _ = steady
    d = tmp_path / "killed"
    job_id = submit(stub, instruction_assets, d, resources={"max_retries": 1})
    status = d / "megastack-status.json"
    wait_for(lambda: status.is_file() and json.loads(status.read_text())["step"] >= 7, 300, "step 7")
    pids = json.loads((d / "megastack-attempt.json").read_text())["pids"]
    os.kill(pids[1], signal.SIGKILL)  # rank 1 dies between the checkpoints of steps 5 and 10
    job = follow(stub, job_id)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, (
        job.status.error + "\n" + log_tail(stub, job_id)
    )
    assert job.status.attempt == 2
    got = curve(d)
    assert sorted(got) == list(range(1, 25))
    assert all(got[s] == ref[s] for s in ref), {s: (ref[s], got[s]) for s in ref if got[s] != ref[s]}


def test_a_bad_spec_is_a_400_naming_the_field(trainer, instruction_assets, tmp_path):
    stub, _, _ = trainer
    with pytest.raises(grpc.RpcError) as e:
        submit(stub, instruction_assets, tmp_path / "bad", deepspeed={"zero_stage": 5})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "deepspeed.zero_stage" in e.value.details()
