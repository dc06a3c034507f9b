"""How often the launcher asks Ray for a job's state (a fake Jobs client: only the polling logic is under
test)."""

import json
import time
from types import SimpleNamespace

import pytest

from services.trainer.jobfiles import STATUS_FILE
from services.trainer.launcher import RayLauncher
from services.trainer.spec import TrainSpec
from services.trainer.wire import spec_record
from shared.jobs import RUNNING, SUCCEEDED, JobStore

pytestmark = pytest.mark.unit


class FakeJobs:
    def __init__(self) -> None:
        self.status, self.calls = "RUNNING", 0

    def get_job_info(self, submission_id: str):
        self.calls += 1
        return SimpleNamespace(status=self.status, message="")


def launcher_with_job(tmp_path, ray_poll_interval_s: float = 5.0):
    store = JobStore(tmp_path / "jobs", "train")
    spec = TrainSpec(
        name="t",
        kind="pretrain",
        seq_length=8,
        train_iters=10,
        save_dir=str(tmp_path / "run"),
        data_paths=(("x", 1.0),),
    )
    (tmp_path / "run").mkdir()
    rec, _ = store.create(spec_record(spec))
    # submitted a minute ago (status files older than the record are an earlier job's)
    store.update(rec.job_id, extra={"submission_id": rec.job_id}, created_unix_s=time.time() - 60)
    launcher = RayLauncher(store, ray_address="http://127.0.0.1:1", ray_poll_interval_s=ray_poll_interval_s)
    launcher._client = fake = FakeJobs()
    return launcher, store, rec.job_id, tmp_path / "run" / STATUS_FILE, fake


def write_status(path, step: int, age_s: float = 0.0, step_time_s: float = 1.0) -> None:
    path.write_text(
        json.dumps(
            {"step": step, "loss": 5.0, "step_time_s": step_time_s, "updated_unix_s": time.time() - age_s}
        )
    )


def test_fresh_steps_spare_the_ray_head_until_the_interval_passes(tmp_path):
    launcher, store, job_id, status, fake = launcher_with_job(tmp_path)
    launcher.poll(job_id)  # pending -> running: Ray is asked
    assert fake.calls == 1 and store.get(job_id).state == RUNNING
    for step in (1, 2, 3):
        write_status(status, step)
        launcher.poll(job_id)
    assert fake.calls == 1  # the status file showed fresh steps: no round trip to the head
    assert store.get(job_id).progress["done"] == 3  # progress still follows the file
    launcher._ray_polled[job_id] -= 5.0  # the interval has passed
    launcher.poll(job_id)
    assert fake.calls == 2


def test_stale_status_last_step_and_forced_polls_ask_ray_every_time(tmp_path):
    launcher, store, job_id, status, fake = launcher_with_job(tmp_path)
    launcher.poll(job_id)
    write_status(status, 4, age_s=10.0)  # no step for 10 s where a step takes 1 s: maybe the rank died
    launcher.poll(job_id)
    launcher.poll(job_id)
    assert fake.calls == 3
    write_status(status, 4)
    launcher.poll(job_id, force=True)
    assert fake.calls == 4
    write_status(status, 10)  # the last step: the job is about to end, its state is wanted at once
    fake.status = "SUCCEEDED"
    launcher.poll(job_id)
    assert fake.calls == 5 and store.get(job_id).state == SUCCEEDED


def test_slow_steps_count_as_fresh_for_three_step_times(tmp_path):
    launcher, _, job_id, status, fake = launcher_with_job(tmp_path)
    launcher.poll(job_id)
    write_status(status, 2, age_s=20.0, step_time_s=30.0)
    launcher.poll(job_id)
    assert fake.calls == 1


def test_zero_interval_asks_ray_at_every_poll(tmp_path):
    launcher, _, job_id, status, fake = launcher_with_job(tmp_path, ray_poll_interval_s=0.0)
    launcher.poll(job_id)
    write_status(status, 1)
    launcher.poll(job_id)
    assert fake.calls == 2


class Refusing:
    """A Jobs API that refuses ``refusals`` submissions with ``text`` first."""

    def __init__(self, refusals: int, text: str) -> None:
        self.refusals, self.text, self.calls = refusals, text, 0

    def submit_job(self, **kw):
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError(f"Request failed with status code 500: {self.text}")
        return kw["submission_id"]


def submit_with(tmp_path, client, agent_wait_s: float):
    store = JobStore(tmp_path / "jobs", "train")
    spec = TrainSpec(
        name="t",
        kind="pretrain",
        seq_length=8,
        train_iters=10,
        save_dir=str(tmp_path / "run"),
        data_paths=(("x", 1.0),),
    )
    rec, _ = store.create(spec_record(spec))
    launcher = RayLauncher(store, ray_address="http://127.0.0.1:1", agent_wait_s=agent_wait_s)
    launcher._client = client
    return launcher.submit(rec, spec), store.get(rec.job_id)


def test_a_head_whose_job_agent_is_not_up_yet_is_asked_again(tmp_path):
    client = Refusing(2, "No available agent to submit job, please try again later.")
    sid, rec = submit_with(tmp_path, client, agent_wait_s=30)
    assert client.calls == 3 and rec.extra["submission_id"] == sid


def test_other_refusals_and_an_agent_that_never_comes_fail_at_once(tmp_path):
    from shared.errors import Unavailable

    client = Refusing(5, "runtime_env is invalid")
    with pytest.raises(Unavailable, match="runtime_env is invalid"):
        submit_with(tmp_path, client, agent_wait_s=30)
    assert client.calls == 1
    never = Refusing(100, "No available agent to submit job, please try again later.")
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="No available agent"):
        submit_with(tmp_path / "b", never, agent_wait_s=1.5)
    assert never.calls >= 2 and time.monotonic() - t0 < 10


def test_each_running_job_has_its_own_series_and_they_go_when_it_ends(tmp_path):
    from prometheus_client import REGISTRY

    launcher, store, job_id, status, fake = launcher_with_job(tmp_path)
    launcher.poll(job_id)
    status.write_text(
        json.dumps(
            {
                "step": 3,
                "loss": 4.5,
                "lr": 1e-3,
                "grad_norm": 0.7,
                "tokens_per_s": 900.0,
                "tflops": 0.02,
                "mfu": 0.125,
                "loss_scale": 65536.0,
                "step_time_s": 1.5,
                "rank_step_time_s": [1.5, 1.2],
                "updated_unix_s": time.time(),
            }
        )
    )
    launcher.poll(job_id)
    labels = {"job_id": job_id, "name": "t"}

    def value(name, **extra):
        return REGISTRY.get_sample_value(name, {**labels, **extra})

    assert value("megastack_trainer_job_loss") == 4.5 and value("megastack_trainer_job_mfu") == 0.125
    assert (
        value("megastack_trainer_job_loss_scale") == 65536.0
        and value("megastack_trainer_job_learning_rate") == 1e-3
    )
    assert (
        value("megastack_trainer_job_tokens_per_second") == 900.0 and value("megastack_trainer_job_step") == 3
    )
    assert value("megastack_trainer_job_rank_step_time_seconds", rank="1") == 1.2
    job = store.get(job_id)
    assert job.progress["metrics"]["mfu"] == 0.125
    fake.status = "SUCCEEDED"
    launcher.poll(job_id, force=True)
    assert (
        value("megastack_trainer_job_loss") is None
        and value("megastack_trainer_job_rank_step_time_seconds", rank="1") is None
    )
