"""EvaluatorService: validate (tasks exist, model reachable), run lm-eval in a worker process, keep
results."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import grpc

from protos.evaluator.v1 import evaluator_pb2 as pb
from protos.evaluator.v1 import evaluator_pb2_grpc as pb_grpc
from services.evaluator import metrics as M
from services.evaluator.harness import (
    check_confined,
    check_data,
    check_reachable,
    check_spec,
    offline_env,
    task_manager,
)
from services.evaluator.wire import evaluation_pb, spec_from_pb, spec_record
from shared.errors import InvalidArgument
from shared.jobs import JobRecord, JobStore, ProcessRunner
from shared.jobs_wire import state_filter


class TaskIndex:
    """lm-eval's task index (about 15,000 names; 10-20 s to parse, ~1 s from index_cache), built once in the
    background."""

    def __init__(self, include_paths: tuple[str, ...]) -> None:
        self.include_paths = include_paths
        self._ready = threading.Event()
        self._tm = None
        threading.Thread(target=self._build, name="task-index", daemon=True).start()

    def _build(self) -> None:
        offline_env()
        self._tm = task_manager(self.include_paths)
        self._ready.set()

    def manager(self, extra_paths: tuple[str, ...]):
        if extra_paths:
            return task_manager(self.include_paths + extra_paths)
        self._ready.wait(timeout=120)
        return self._tm


class EvaluatorServicer(pb_grpc.EvaluatorServiceServicer):
    def __init__(
        self,
        store: JobStore,
        *,
        max_concurrent: int,
        include_paths: tuple[str, ...] = (),
        request_cache: Path | None = None,
    ) -> None:
        self.store = store
        self.request_cache = request_cache
        self.include_paths = include_paths
        self.index = TaskIndex(include_paths)
        self.runner = ProcessRunner(store, self._argv, max_concurrent=max_concurrent, on_end=self._ended)

    def _argv(self, rec: JobRecord) -> list[str]:
        d = self.store.job_dir(rec.job_id)
        spec = {**rec.spec, "include_paths": [*self.include_paths, *rec.spec.get("include_paths", [])]}
        (d / "spec.json").write_text(json.dumps(spec))
        cache = [str(self.request_cache)] if self.request_cache is not None else []
        return [sys.executable, "-m", "services.evaluator.worker", str(d / "spec.json"), str(d), *cache]

    @staticmethod
    def _ended(rec: JobRecord) -> None:
        M.RUNS.labels(rec.state).inc()
        if rec.result:
            M.DURATION.observe(rec.result.get("seconds", 0.0))
            M.REQUESTS.inc(rec.result.get("num_requests", 0))
            for t in rec.result.get("tasks", []):
                for metric, value in t["metrics"].items():
                    M.SCORE.labels(t["task"], metric).set(value)

    def SubmitEvaluation(
        self, request: pb.SubmitEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.SubmitEvaluationResponse:
        if request.spec.WhichOneof("model") is None:
            raise InvalidArgument(
                "give a model: textgen_address, hf_checkpoint or completions_url", field="model"
            )
        spec = spec_from_pb(request.spec)
        check_confined(spec)  # before any task folder is read or any model called
        tm = self.index.manager(spec.include_paths)
        check_spec(spec, list(tm.all_tasks))
        check_data(tm, spec.tasks)
        check_reachable(spec)
        if request.validate_only:  # the checks of a submit, nothing created
            return pb.SubmitEvaluationResponse(job_id="")
        rec, new = self.store.create(
            spec_record(spec), labels=dict(request.labels), request_id=request.request_id
        )
        if new:
            self.runner.submit(rec)
        return pb.SubmitEvaluationResponse(job_id=rec.job_id)

    def GetEvaluation(
        self, request: pb.GetEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.GetEvaluationResponse:
        return pb.GetEvaluationResponse(evaluation=evaluation_pb(self.store.get(request.job_id)))

    def WatchEvaluation(self, request: pb.WatchEvaluationRequest, context: grpc.ServicerContext):
        for rec, lines in self.store.watch(request.job_id, context.is_active):
            yield pb.WatchEvaluationResponse(evaluation=evaluation_pb(rec), log_lines=lines)

    def CancelEvaluation(
        self, request: pb.CancelEvaluationRequest, context: grpc.ServicerContext
    ) -> pb.CancelEvaluationResponse:
        return pb.CancelEvaluationResponse(
            evaluation=evaluation_pb(self.runner.cancel(request.job_id, request.reason))
        )

    def ListEvaluations(
        self, request: pb.ListEvaluationsRequest, context: grpc.ServicerContext
    ) -> pb.ListEvaluationsResponse:
        return pb.ListEvaluationsResponse(
            evaluations=[
                evaluation_pb(r) for r in self.store.list(state_filter(request.state), request.limit)
            ]
        )
