"""TrainerService: validate the spec, submit to Ray, follow, cancel, stream logs."""

from __future__ import annotations

import contextlib
import time

import grpc

from protos.trainer.v1 import trainer_pb2 as pb
from protos.trainer.v1 import trainer_pb2_grpc as pb_grpc
from services.trainer.evaluations import CheckpointEvaluations
from services.trainer.launcher import RayLauncher
from services.trainer.spec import absolutize, check_roots, validate
from services.trainer.wire import job_pb, spec_from_pb, spec_record
from shared.jobs import JobStore
from shared.jobs_wire import state_filter


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(
        self, store: JobStore, launcher: RayLauncher, evaluations: CheckpointEvaluations | None = None
    ) -> None:
        self.store = store
        self.launcher = launcher
        self.evaluations = evaluations or CheckpointEvaluations(store, converter_addr="", evaluator_addr="")

    def SubmitTrainJob(
        self, request: pb.SubmitTrainJobRequest, context: grpc.ServicerContext
    ) -> pb.SubmitTrainJobResponse:
        spec = absolutize(spec_from_pb(request.spec))  # relative paths: against the service's folder
        check_roots(spec)  # before anything is read: only under the data roots
        validate(
            spec
        )  # a bad spec is refused here, before anything reaches the cluster (the one place it is checked)
        self.evaluations.check(spec)  # `evaluate` needs the converter and evaluator this trainer talks to
        if request.validate_only:  # the CLI's --dry-run
            return pb.SubmitTrainJobResponse(job_id="")
        _ = self.launcher.client  # the cluster must be reachable before a record exists
        rec, new = self.store.create(
            spec_record(spec), labels=dict(request.labels), request_id=request.request_id
        )
        if new:
            try:
                self.launcher.submit(rec, spec)
            except Exception as e:
                self.store.update(rec.job_id, state="failed", error=getattr(e, "message", str(e)))
                raise
        return pb.SubmitTrainJobResponse(job_id=rec.job_id)

    def GetTrainJob(
        self, request: pb.GetTrainJobRequest, context: grpc.ServicerContext
    ) -> pb.GetTrainJobResponse:
        self.launcher.poll(request.job_id) if not self.store.get(request.job_id).terminal else None
        return pb.GetTrainJobResponse(job=job_pb(self.store.get(request.job_id)))

    def WatchTrainJob(self, request: pb.WatchTrainJobRequest, context: grpc.ServicerContext):
        for rec, _ in self.store.watch(request.job_id, context.is_active):
            yield pb.WatchTrainJobResponse(job=job_pb(rec))

    def CancelTrainJob(
        self, request: pb.CancelTrainJobRequest, context: grpc.ServicerContext
    ) -> pb.CancelTrainJobResponse:
        return pb.CancelTrainJobResponse(job=job_pb(self.launcher.cancel(request.job_id, request.reason)))

    def ListTrainJobs(
        self, request: pb.ListTrainJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListTrainJobsResponse:
        return pb.ListTrainJobsResponse(
            jobs=[job_pb(r) for r in self.store.list(state_filter(request.state), request.limit)]
        )

    def GetTrainJobLogs(self, request: pb.GetTrainJobLogsRequest, context: grpc.ServicerContext):
        self.store.get(request.job_id)
        with (
            self.store.watchers.hold() if request.follow else contextlib.nullcontext()
        ):  # following is a watch
            yield from self._logs(request, context)

    def _logs(self, request: pb.GetTrainJobLogsRequest, context: grpc.ServicerContext):
        sent = 0
        while True:
            lines = self.launcher.logs(request.job_id)
            if len(lines) > sent:
                yield pb.GetTrainJobLogsResponse(lines=lines[sent:])
                sent = len(lines)
            if not request.follow or self.store.get(request.job_id).terminal or not context.is_active():
                if request.follow:  # the last lines can land just after the job ends
                    lines = self.launcher.logs(request.job_id)
                    if len(lines) > sent:
                        yield pb.GetTrainJobLogsResponse(lines=lines[sent:])
                return
            time.sleep(1.0)
