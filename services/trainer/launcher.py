"""Ray Jobs launcher: submit, follow, cancel, logs. Records live in a JobStore (survive restarts).

A training job is one Ray job running ``services.trainer.ray_driver``; its metadata carries the
megastack job id and a spec summary, so ``ray job list`` shows it. Progress comes from the Ray job
status and from ``<save_dir>/megastack-status.json`` / ``megastack-attempt.json`` written by the job.
After a launcher restart, unfinished records are followed again (the Ray job kept running).

Asking Ray for a job's state is an HTTP round trip through the dashboard and the GCS (about 15 ms of
CPU on the head); on a small node those processes share the cores with the training ranks. While the
job's own status file shows fresh steps, the job is plainly running, so Ray is asked at most every
``ray_poll_interval_s``; a stale status file, the last step, or a cancel asks Ray at every poll.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from services.trainer import metrics as M
from services.trainer.jobfiles import ATTEMPT_FILE, RESOURCE_WAIT_ENV, STATUS_FILE
from services.trainer.spec import TrainSpec
from services.trainer.wire import spec_from_record
from shared.errors import FailedPrecondition, Unavailable
from shared.jobs import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, JobRecord, JobStore
from shared.paths import REPO_ROOT

logger = logging.getLogger(__name__)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
NO_AGENT = "No available agent"  # Ray's answer while the head's job agent is not registered yet
RAY_STATES = {
    "PENDING": PENDING,
    "RUNNING": RUNNING,
    "SUCCEEDED": SUCCEEDED,
    "FAILED": FAILED,
    "STOPPED": CANCELLED,
}


def clean_log(text: str) -> list[str]:
    return [ANSI.sub("", line) for line in text.splitlines()]


class RayLauncher:
    def __init__(
        self,
        store: JobStore,
        *,
        ray_address: str,
        python: str = "",
        runtime_env: dict[str, Any] | None = None,
        poll_interval_s: float = 1.0,
        resource_wait_s: float = 0.0,
        ray_poll_interval_s: float = 5.0,
        agent_wait_s: float = 60.0,
    ) -> None:
        self.store = store
        self.address = ray_address
        self.python = python or sys.executable
        self.runtime_env = runtime_env or {}
        self.poll_interval_s = poll_interval_s
        self.ray_poll_interval_s = ray_poll_interval_s
        self._ray_polled: dict[str, float] = {}  # job id -> monotonic time of the last Ray state query
        self.resource_wait_s = resource_wait_s
        self.agent_wait_s = agent_wait_s
        self._client = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow_loop, name="trainer-follow", daemon=True)

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as e:  # noqa: BLE001 - ConnectionError and friends
                raise Unavailable(
                    f"Ray cluster at {self.address} is unreachable ({type(e).__name__}); is it up? (`make "
                    "up`)"
                ) from None
        return self._client

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # -- submit / cancel / logs ------------------------------------------------------------------
    def submit(self, rec: JobRecord, spec: TrainSpec) -> str:
        spec_path = self.store.job_dir(rec.job_id) / "spec.json"
        spec_path.write_text(spec.to_json())
        env = dict(self.runtime_env)
        env_vars = {
            "PYTHONPATH": str(REPO_ROOT),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            RESOURCE_WAIT_ENV: f"{self.resource_wait_s:g}",
            **env.pop("env_vars", {}),
        }
        submission_id = f"{rec.job_id}"
        metadata = {
            "megastack_job_id": rec.job_id,
            "megastack_name": spec.name,
            "megastack_kind": spec.kind,
            "megastack_parallel": f"tp={spec.tp},pp={spec.pp},dp={spec.dp},vpp={spec.vpp}",
            "megastack_save_dir": spec.save_dir,
            "megastack_spec": str(spec_path),
        }
        deadline = time.monotonic() + self.agent_wait_s
        while True:
            try:
                sid = self.client.submit_job(
                    entrypoint=f"{self.python} -m services.trainer.ray_driver {spec_path}",
                    submission_id=submission_id,
                    runtime_env={**env, "env_vars": env_vars},
                    metadata=metadata,
                )
                break
            except Unavailable:
                raise
            except Exception as e:  # noqa: BLE001 - the Jobs API refused it
                # A head that has just started answers HTTP before its job agent has registered, and says so
                # ("please try again later"); nothing was submitted, so asking again is safe.
                if NO_AGENT in str(e) and time.monotonic() < deadline:
                    logger.info("Ray's job agent is not up yet; submitting %s again in 1 s", rec.job_id)
                    time.sleep(1.0)
                    continue
                raise Unavailable(f"Ray refused the job: {e}") from None
        self.store.update(rec.job_id, extra={**rec.extra, "submission_id": sid, "ray_address": self.address})
        M.SUBMITTED.inc()
        return sid

    def cancel(self, job_id: str, reason: str) -> JobRecord:
        rec = self.store.get(job_id)
        if rec.terminal:
            raise FailedPrecondition(f"job {job_id} already {rec.state}", field="job_id")
        self.store.update(job_id, extra={**rec.extra, "cancel_reason": reason or "cancelled by request"})
        sid = rec.extra.get("submission_id")
        if sid:
            self.client.stop_job(sid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.poll(job_id, force=True)
            rec = self.store.get(job_id)
            if rec.terminal:
                return rec
            time.sleep(0.2)
        return rec

    def logs(self, job_id: str) -> list[str]:
        rec = self.store.get(job_id)
        sid = rec.extra.get("submission_id")
        if not sid:
            return []
        try:
            return clean_log(self.client.get_job_logs(sid))
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"cannot read logs of {sid} from Ray: {e}") from None

    # -- following -------------------------------------------------------------------------------
    def _follow_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            active = [r.job_id for r in self.store.list() if not r.terminal and r.extra.get("submission_id")]
            M.ACTIVE.set(len(active))
            for job_id in active:
                try:
                    self.poll(job_id)
                except Exception:  # noqa: BLE001 - keep following the others
                    logger.warning("cannot poll %s", job_id, exc_info=True)

    def poll(self, job_id: str, *, force: bool = False) -> None:
        rec = self.store.get(job_id)
        if rec.terminal:
            return
        spec = spec_from_record(rec.spec)
        status = _read_json(Path(spec.save_dir) / STATUS_FILE)
        attempt = _read_json(Path(spec.save_dir) / ATTEMPT_FILE)
        now = time.monotonic()
        if (
            force
            or not _steps_are_fresh(status, rec, spec)
            or now - self._ray_polled.get(job_id, -1e9) >= self.ray_poll_interval_s
        ):
            self._ray_polled[job_id] = now
            try:
                info = self.client.get_job_info(rec.extra["submission_id"])
            except Exception as e:  # noqa: BLE001 - a job the cluster no longer knows
                if "does not exist" in str(e) or "404" in str(e):
                    self.store.update(
                        job_id,
                        state=FAILED,
                        error="the Ray cluster no longer knows this job (was it restarted?)",
                    )
                    M.FINISHED.labels(FAILED).inc()
                return
        else:
            info = None  # the status file just showed a fresh step: the job runs, Ray need not be asked
        state = (
            rec.state
            if info is None
            else RAY_STATES.get(
                str(info.status.value if hasattr(info.status, "value") else info.status), rec.state
            )
        )
        changes: dict[str, Any] = {}
        extra = dict(rec.extra)
        if status and status.get("updated_unix_s", 0) >= rec.created_unix_s:
            extra["metrics"] = status
            metrics = {
                k: float(status[k])
                for k in (
                    "loss",
                    "lr",
                    "grad_norm",
                    "tokens_per_s",
                    "tflops",
                    "step_time_s",
                    "mfu",
                    "loss_scale",
                )
                if k in status
            }
            total = int(status.get("train_iters") or spec.train_iters)  # hf-deepspeed epochs: the job counts
            changes["progress"] = {
                "done": status.get("step", 0),
                "total": total,
                "unit": "steps",
                "message": f"step {status.get('step', 0)}/{total}",
                "metrics": metrics,
            }
            M.set_job(job_id, spec.name, status)
            M.STEP_TIME.set(metrics.get("step_time_s", 0.0))
            M.TOKENS.set(metrics.get("tokens_per_s", 0.0))
            if "loss" in metrics:
                M.LOSS.set(metrics["loss"])
        if (
            attempt
            and attempt.get("started_unix_s", 0) >= rec.created_unix_s
            and attempt["attempt"] != rec.attempt
        ):
            changes["attempt"] = attempt["attempt"]
            M.RESTARTS.labels(attempt.get("restart_reason", "rank_failed")).inc(
                max(0, attempt["attempt"] - rec.attempt)
            )
        if state != rec.state:
            changes["state"] = state
            if state == FAILED:
                changes["error"] = self._failure_reason(rec, info)
            elif state == CANCELLED:
                changes["error"] = extra.get("cancel_reason", "stopped through Ray")
            if state in (SUCCEEDED, FAILED, CANCELLED):
                M.FINISHED.labels(state).inc()
        if extra != rec.extra:
            changes["extra"] = extra
        if changes:
            self.store.update(job_id, **changes)
        if state in (SUCCEEDED, FAILED, CANCELLED):
            self._ray_polled.pop(job_id, None)
            M.drop_job(job_id, spec.name)

    def _failure_reason(self, rec: JobRecord, info: Any) -> str:
        try:
            lines = clean_log(self.client.get_job_logs(rec.extra["submission_id"]))
        except Exception:  # noqa: BLE001
            lines = []
        mine = [line.split("ERROR: ", 1)[1] for line in lines if "driver ERROR: " in line]
        return mine[-1] if mine else (info.message or "the Ray job failed")


def _steps_are_fresh(status: dict[str, Any] | None, rec: JobRecord, spec: TrainSpec) -> bool:
    """The job is running and its last step, not the final one, was written within three step times."""
    if rec.state != RUNNING or not status or status.get("updated_unix_s", 0) < rec.created_unix_s:
        return False
    if status.get("step", 0) >= int(status.get("train_iters") or spec.train_iters):
        return False
    return time.time() - status["updated_unix_s"] < 3 * max(1.0, float(status.get("step_time_s") or 0))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
