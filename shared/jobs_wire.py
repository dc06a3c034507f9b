"""JobRecord <-> the common protobuf job shapes.

A job's spec is kept in its record (and handed to its worker) as the JSON mapping of the service's spec
message, the same JSON the HTTP job routes take: :func:`spec_doc` writes it, :func:`spec_message` reads it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

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
M = TypeVar("M", bound=Message)


def spec_doc(msg: Message) -> dict[str, Any]:
    """A spec message as the JSON kept on disk (field names as in the .proto, defaults left out)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def spec_message(doc: dict[str, Any], cls: type[M]) -> M:
    """The spec message kept as ``doc`` (fields a newer writer added are ignored)."""
    return json_format.ParseDict(doc, cls(), ignore_unknown_fields=True)


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
