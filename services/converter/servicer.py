"""ConverterService: validate, record, run in a worker process, report."""

from __future__ import annotations

import json
import sys

import grpc

from protos.converter.v1 import converter_pb2 as pb
from protos.converter.v1 import converter_pb2_grpc as pb_grpc
from services.converter import metrics as M
from services.converter.conversion import validate
from services.converter.wire import conversion_pb, spec_from_pb, spec_from_record, spec_record
from shared.jobs import JobRecord, JobStore, ProcessRunner
from shared.jobs_wire import state_filter
from shared.roots import under_roots


class ConverterServicer(pb_grpc.ConverterServiceServicer):
    def __init__(self, store: JobStore, *, max_concurrent: int, cancel_grace_s: float) -> None:
        self.store = store
        self.runner = ProcessRunner(
            store,
            self._argv,
            max_concurrent=max_concurrent,
            cancel_grace_s=cancel_grace_s,
            on_end=self._ended,
        )

    def _argv(self, rec: JobRecord) -> list[str]:
        path = self.store.job_dir(rec.job_id) / "spec.json"
        path.write_text(json.dumps(rec.spec))
        return [sys.executable, "-m", "services.converter.worker", str(path)]

    @staticmethod
    def _ended(rec: JobRecord) -> None:
        M.JOBS.labels(rec.state).inc()
        if rec.result:
            M.DURATION.labels(spec_from_record(rec.spec).target_format).observe(
                rec.result.get("seconds", 0.0)
            )
            M.BYTES.inc(rec.result.get("bytes_written", 0))
            M.PEAK_RSS.set(rec.result.get("peak_rss_bytes", 0))
            parity = rec.result.get("parity") or {}
            if parity:
                M.LOGIT_DIFF.set(parity["max_abs_logit_diff"])
                M.TOP1.set(parity["top1_agreement"])

    def SubmitConversion(
        self, request: pb.SubmitConversionRequest, context: grpc.ServicerContext
    ) -> pb.SubmitConversionResponse:
        spec = spec_from_pb(request.spec)
        for attr, field in (("load_dir", "load_dir"), ("save_dir", "save_dir"), ("lora_dir", "lora_load")):
            if getattr(spec, attr) is not None:  # before anything is read: only under the data roots
                under_roots(getattr(spec, attr), field)
        validate(spec)  # bad input is refused here, before anything runs or is written
        if request.validate_only:
            return pb.SubmitConversionResponse(job_id="")
        rec, new = self.store.create(
            spec_record(spec), labels=dict(request.labels), request_id=request.request_id
        )
        if new:
            self.runner.submit(rec)
        return pb.SubmitConversionResponse(job_id=rec.job_id)

    def GetConversion(
        self, request: pb.GetConversionRequest, context: grpc.ServicerContext
    ) -> pb.GetConversionResponse:
        return pb.GetConversionResponse(conversion=conversion_pb(self.store.get(request.job_id)))

    def WatchConversion(self, request: pb.WatchConversionRequest, context: grpc.ServicerContext):
        for rec, lines in self.store.watch(request.job_id, context.is_active):
            yield pb.WatchConversionResponse(conversion=conversion_pb(rec), log_lines=lines)

    def CancelConversion(
        self, request: pb.CancelConversionRequest, context: grpc.ServicerContext
    ) -> pb.CancelConversionResponse:
        return pb.CancelConversionResponse(
            conversion=conversion_pb(self.runner.cancel(request.job_id, request.reason))
        )

    def ListConversions(
        self, request: pb.ListConversionsRequest, context: grpc.ServicerContext
    ) -> pb.ListConversionsResponse:
        recs = self.store.list(state_filter(request.state), request.limit)
        return pb.ListConversionsResponse(conversions=[conversion_pb(r) for r in recs])
