"""Real megatron-core training through the trainer service on a real local Ray head (CPU, gloo)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import grpc
import pytest

from protos.common.v1 import common_pb2
from protos.trainer.v1 import trainer_pb2 as pb
from services.trainer.wire import spec_from_dict, spec_to_pb
from tests.fixtures.training import curve, spec_doc, wait_for


def submit(stub, assets, save_dir, **over) -> str:
    spec = spec_from_dict(spec_doc(assets, save_dir, **over))
    return stub.SubmitTrainJob(pb.SubmitTrainJobRequest(spec=spec_to_pb(spec))).job_id


def follow(stub, job_id):
    last = None
    for ev in stub.WatchTrainJob(pb.WatchTrainJobRequest(job_id=job_id), timeout=600):
        last = ev.job
    return last


def falls(losses: dict[int, float]) -> bool:
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:3]) / 3
    last = sum(losses[s] for s in steps[-3:]) / 3
    return last < first - 0.05


@pytest.mark.parametrize(
    "parallel", [{"tensor_parallel": 2}, {"tensor_parallel": 1, "pipeline_parallel": 2}], ids=["tp2", "pp2"]
)
def test_trains_20_steps_and_the_loss_goes_down(trainer, train_assets, tmp_path, parallel):
    stub, _, _ = trainer
    job_id = submit(stub, train_assets, tmp_path / "run", parallel=parallel)
    job = follow(stub, job_id)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.error
    assert job.metrics.step == 20 and job.metrics.tokens_per_s > 0 and job.metrics.last_checkpoint_step == 20
    # MFU against the GEMM peak the ranks measured, fp32's loss scale of 1, both ranks' step times
    assert (
        0 < job.metrics.mfu < 10 and job.metrics.loss_scale == 1.0 and len(job.metrics.rank_step_time_s) == 2
    )
    assert all(t > 0 for t in job.metrics.rank_step_time_s)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload().Tags()["scalars"]
    assert {"lm-loss", "throughput/mfu", "loss-scale", "time/step_s/rank0", "time/step_s/rank1"} <= set(
        tags
    ), tags
    losses = curve(tmp_path / "run")
    assert sorted(losses) == list(range(1, 21)) and falls(losses), losses
    assert (tmp_path / "run" / "iter_0000020").is_dir() and (tmp_path / "run" / "tensorboard").is_dir()
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == "20"
    assert not list((tmp_path / "run").glob(".tmp-*"))
    # the save folder describes itself: the converter turns the trained checkpoint into HF on its own
    from services.converter.conversion import ConvertSpec, convert

    result = convert(
        ConvertSpec(load_dir=tmp_path / "run", save_dir=tmp_path / "hf", target_format="hf", verify=True)
    )
    assert result.parity["max_abs_logit_diff"] < 1e-4 and result.parity["weights_exact"]
    assert (tmp_path / "hf" / "config.json").is_file() and list((tmp_path / "hf").glob("tokenizer*"))


@pytest.fixture(scope="module")
def steady_run(trainer, train_assets, tmp_path_factory):
    """The uninterrupted run the faulted ones must reproduce."""
    stub, _, _ = trainer
    d = tmp_path_factory.mktemp("steady") / "run"
    steady = follow(stub, submit(stub, train_assets, d))
    assert steady.status.state == common_pb2.JOB_STATE_SUCCEEDED, steady.status.error
    return curve(d), d


def same_as_steady(steady, save_dir) -> None:
    """Bit for bit: every step's loss, and every tensor of the final checkpoint."""
    from llm.checkpoints import open_checkpoint

    ref, ref_dir = steady
    got = curve(save_dir)
    assert sorted(got) == list(range(1, 21))
    assert all(got[s] == ref[s] for s in ref), {s: (ref[s], got[s]) for s in ref if got[s] != ref[s]}
    a, b = open_checkpoint(ref_dir), open_checkpoint(save_dir)
    assert a.names() == b.names()
    for name in a.names():
        assert (a.get(name) == b.get(name)).all(), name


def test_a_killed_rank_resumes_from_its_checkpoint_bit_for_bit(trainer, train_assets, tmp_path, steady_run):
    stub, _, _ = trainer
    job_id = submit(stub, train_assets, tmp_path / "killed", resources={"max_retries": 1})
    status = tmp_path / "killed" / "megastack-status.json"
    wait_for(lambda: status.is_file() and json.loads(status.read_text())["step"] >= 8, 300, "step 8")
    pids = json.loads((tmp_path / "killed" / "megastack-attempt.json").read_text())["pids"]
    os.kill(pids[1], signal.SIGKILL)  # rank 1 dies mid-run
    job = follow(stub, job_id)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.error
    assert job.status.attempt == 2
    same_as_steady(steady_run, tmp_path / "killed")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(x) for x in (task / "children").read_text().split()]
    return out


def test_a_stopped_rank_is_a_hang_and_the_job_resumes_bit_for_bit(
    trainer, train_assets, tmp_path, steady_run
):
    """A rank that stops making progress (SIGSTOP: a deadlock, a stuck filesystem) is not a dead rank: only
    its heartbeat tells. After resources.hang_timeout_s the attempt restarts from the last checkpoint."""
    from services.trainer import metrics as M

    stub, _, _ = trainer
    hangs = M.RESTARTS.labels("hang")._value.get()
    job_id = submit(
        stub, train_assets, tmp_path / "stopped", resources={"max_retries": 1, "hang_timeout_s": 20}
    )
    status = tmp_path / "stopped" / "megastack-status.json"
    wait_for(lambda: status.is_file() and json.loads(status.read_text())["step"] >= 8, 300, "step 8")
    actor = json.loads((tmp_path / "stopped" / "megastack-attempt.json").read_text())["pids"][1]
    (rank,) = _children(actor)  # the training process the actor runs
    os.kill(rank, signal.SIGSTOP)
    job = follow(stub, job_id)
    assert job.status.state == common_pb2.JOB_STATE_SUCCEEDED, job.status.error
    assert job.status.attempt == 2
    attempt = json.loads((tmp_path / "stopped" / "megastack-attempt.json").read_text())
    assert attempt["restart_reason"] == "hang" and "made no progress" in attempt["previous_failure"]
    assert M.RESTARTS.labels("hang")._value.get() == hangs + 1
    same_as_steady(steady_run, tmp_path / "stopped")


def test_cancel_stops_every_rank(trainer, train_assets, tmp_path):
    stub, _, _ = trainer
    job_id = submit(stub, train_assets, tmp_path / "run", training={"train_iters": 400})
    status = tmp_path / "run" / "megastack-status.json"
    wait_for(lambda: status.is_file(), 300, "first step")
    pids = json.loads((tmp_path / "run" / "megastack-attempt.json").read_text())["pids"]
    job = stub.CancelTrainJob(pb.CancelTrainJobRequest(job_id=job_id, reason="enough")).job
    assert job.status.state == common_pb2.JOB_STATE_CANCELLED and job.status.error == "enough"

    def all_gone():
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        return not alive

    wait_for(all_gone, 30, "ranks to exit")
    with pytest.raises(grpc.RpcError) as e:
        stub.CancelTrainJob(pb.CancelTrainJobRequest(job_id=job_id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_bad_spec_is_rejected_before_anything_is_submitted(trainer, train_assets, tmp_path):
    stub, store, launcher = trainer
    before = len(launcher.client.list_jobs())
    with pytest.raises(grpc.RpcError) as e:
        submit(stub, train_assets, tmp_path / "run", training={"global_batch_size": 7})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "global_batch_size" in e.value.details()
    assert len(launcher.client.list_jobs()) == before


def test_validate_only_checks_like_a_submit_and_creates_nothing(trainer, train_assets, tmp_path):
    """The CLI's --dry-run: the service is the one place a spec is checked."""
    stub, store, _ = trainer
    records = len(store.list())
    good = spec_to_pb(spec_from_dict(spec_doc(train_assets, tmp_path / "run")))
    assert stub.SubmitTrainJob(pb.SubmitTrainJobRequest(spec=good, validate_only=True)).job_id == ""
    bad = spec_to_pb(
        spec_from_dict(spec_doc(train_assets, tmp_path / "run", training={"global_batch_size": 7}))
    )
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitTrainJob(pb.SubmitTrainJobRequest(spec=bad, validate_only=True))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "global_batch_size" in e.value.details()
    assert len(store.list()) == records and not (tmp_path / "run").exists()


def test_a_job_asking_gpus_of_a_cpu_cluster_fails_at_once_naming_the_field(trainer, train_assets, tmp_path):
    stub, _, _ = trainer
    job_id = submit(stub, train_assets, tmp_path / "run", resources={"gpus_per_worker": 1})
    job = follow(stub, job_id)  # ends: no waiting on a placement the cluster can never give
    assert job.status.state == common_pb2.JOB_STATE_FAILED
    assert "0 GPU in all" in job.status.error and "resources.gpus_per_worker" in job.status.error, (
        job.status.error
    )
    assert job.status.finished_unix_s - job.status.created_unix_s < 60


def test_logs_list_and_a_restarted_launcher_keeps_following(trainer, train_assets, tmp_path, ray_head):
    from services.trainer.launcher import RayLauncher
    from shared.jobs import JobStore

    stub, store, launcher = trainer
    job_id = submit(stub, train_assets, tmp_path / "run", training={"train_iters": 10})
    wait_for(lambda: (tmp_path / "run" / "megastack-status.json").is_file(), 300, "first step")
    # a second launcher over the same records, as after a restart: the running job is listed and followed
    again = RayLauncher(JobStore(store.root, "train"), ray_address=ray_head, poll_interval_s=0.5)
    assert job_id in [r.job_id for r in again.store.list()]
    again.start()
    try:
        wait_for(lambda: again.store.get(job_id).terminal, 300, "job end seen by the new launcher")
        assert again.store.get(job_id).state == "succeeded"
    finally:
        again.stop()
    lines = [
        line
        for chunk in stub.GetTrainJobLogs(pb.GetTrainJobLogsRequest(job_id=job_id, follow=True))
        for line in chunk.lines
    ]
    assert any("@@metrics" in line for line in lines) and any("training finished" in line for line in lines)
    listed = stub.ListTrainJobs(pb.ListTrainJobsRequest()).jobs
    assert job_id in [j.status.job_id for j in listed]
    ray_jobs = {j.submission_id: j.metadata for j in launcher.client.list_jobs()}
    assert ray_jobs[job_id]["megastack_job_id"] == job_id and ray_jobs[job_id][
        "megastack_parallel"
    ].startswith("tp=2")


def test_the_ray_head_runs_nothing_for_callers_without_its_token(ray_head):
    """Ray's Jobs API runs any command: the head the stack starts answers only callers with its token."""
    import requests

    from tools.stack import ray_auth_env

    body = {"entrypoint": "touch /tmp/megastack-should-not-exist"}
    r = requests.post(f"{ray_head}/api/jobs/", json=body, timeout=30)
    assert r.status_code in (401, 403), r.text
    assert requests.get(f"{ray_head}/api/jobs/", timeout=30).status_code in (401, 403)
    token = open(ray_auth_env(Path("/nonexistent"))["RAY_AUTH_TOKEN_PATH"]).read().strip()
    assert (
        requests.get(
            f"{ray_head}/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=30
        ).status_code
        == 200
    )
