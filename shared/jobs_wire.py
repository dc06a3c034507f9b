"""JobRecord <-> the common protobuf job shapes."""

from __future__ import annotations

from protos.common.v1 import common_pb2
from shared.jobs import CANCELLED, FAILED, PENDING, RUNNING, SUCCEEDED, JobRecord

STATE_TO_PB = {
    PENDING: common_pb2.JOB_STATE_PENDING,
    RUNNING: common_pb2.JOB_STATE_RUNNING,
    SUCCEEDED: common_pb2.JOB_STATE_SUCCEEDED,
    FAILED: common_pb2.JOB_STATE_FAILED,
    CANCELLED: common_pb2.JOB_STATE_CANCELLED,
}
PB_TO_STATE: dict[int, str] = {int(v): k for k, v in STATE_TO_PB.items()}


def status_pb(rec: JobRecord) -> common_pb2.JobStatus:
    """A job record as the common JobStatus message."""
    p = rec.progress
    return common_pb2.JobStatus(
        job_id=rec.job_id,
        state=STATE_TO_PB[rec.state],
        error=rec.error,
        progress=common_pb2.Progress(
            done=p.get("done", 0),
            total=p.get("total", 0),
            unit=p.get("unit", ""),
            message=p.get("message", ""),
            metrics={k: float(v) for k, v in (p.get("metrics") or {}).items()},
        ),
        created_unix_s=rec.created_unix_s,
        started_unix_s=rec.started_unix_s,
        finished_unix_s=rec.finished_unix_s,
        labels=rec.labels,
        attempt=rec.attempt,
        request_id=rec.request_id,
    )


def state_filter(state: int) -> str | None:
    """The record state a JobState filter stands for (None = all)."""
    return PB_TO_STATE.get(state)
