"""Job endpoints: the converter, trainer and evaluator services' long work over HTTP.

Every kind has the one job shape of the protos (Submit -> job id, Get, Watch, Cancel, List), so one
table drives all routes. Bodies and answers are the protos' JSON mapping (as grpc-gateway does), so
what the gRPC API takes, HTTP takes, and the services validate it (their INVALID_ARGUMENT, naming the
field, becomes a 400):

    GET  /v1/jobs                          every kind's jobs, newest first (?limit=, ?state=)
    GET  /v1/jobs/<kind>                   one kind's jobs (kind: conversions | training | evaluations)
    POST /v1/jobs/<kind>                   submit {"spec": {...}, "labels": {...}} -> 201 {"job_id"}
    GET  /v1/jobs/<kind>/<id>              one job
    POST /v1/jobs/<kind>/<id>/cancel       {"reason": "..."} (optional)
    GET  /v1/jobs/<kind>/<id>/events       server-sent events: the job at each change, until it ends
    GET  /v1/jobs/training/<id>/logs       the job's log lines (all ranks)
    GET  /v1/jobs/training/<id>/evaluations  its checkpoints' scores (spec.evaluate): the leaderboard rows
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from flask import Response, request, stream_with_context
from flask_restful import Resource
from google.protobuf import json_format

from protos.common.v1 import common_pb2
from protos.converter.v1 import converter_pb2, converter_pb2_grpc
from protos.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc
from protos.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.gateway.http import SSE_HEADERS, HTTPError, json_body, json_response, sse, stream_error
from shared.errors import ResourceExhausted, from_rpc_error
from shared.grpc.channel import call_metadata, make_channel
from shared.jobs import WatchSlots


@dataclass(frozen=True)
class JobKind:
    service: str  # the config field naming its address, and the word used in messages
    stub: type
    module: Any  # the *_pb2 module
    noun: str  # Submit<noun>, Get<noun>, Watch<noun>, Cancel<noun>
    plural: str  # List<plural>
    field: str  # the job message's field in Get/Watch/Cancel responses
    list_field: str  # the repeated field of the List response


KINDS = {
    "conversions": JobKind(
        "converter",
        converter_pb2_grpc.ConverterServiceStub,
        converter_pb2,
        "Conversion",
        "Conversions",
        "conversion",
        "conversions",
    ),
    "training": JobKind(
        "trainer", trainer_pb2_grpc.TrainerServiceStub, trainer_pb2, "TrainJob", "TrainJobs", "job", "jobs"
    ),
    "evaluations": JobKind(
        "evaluator",
        evaluator_pb2_grpc.EvaluatorServiceStub,
        evaluator_pb2,
        "Evaluation",
        "Evaluations",
        "evaluation",
        "evaluations",
    ),
}
STATES = {
    name.removeprefix("JOB_STATE_").lower(): value for name, value in common_pb2.JobState.items() if value
}


def to_json(msg) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


class JobClients:
    """One channel per job service, opened on first use (a service that is not deployed costs nothing)."""

    def __init__(self, addresses: dict[str, str], timeout_s: float = 30.0, max_watchers: int = 16) -> None:
        self.addresses = addresses
        self.timeout_s = timeout_s
        self.watchers = WatchSlots(
            max_watchers, "MEGASTACK_GATEWAY_MAX_WATCHERS"
        )  # SSE event streams held open
        self._stubs: dict[str, Any] = {}
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    def stub(self, kind: JobKind):
        address = self.addresses.get(kind.service, "")
        if not address:
            raise HTTPError(
                503,
                f"the gateway has no {kind.service} service configured "
                f"(MEGASTACK_GATEWAY_{kind.service.upper()}_ADDR)",
            )
        with self._lock:
            if kind.service not in self._stubs:
                channel = make_channel(address)
                self._channels.append(channel)
                self._stubs[kind.service] = kind.stub(channel)
            return self._stubs[kind.service]

    def call(self, kind: JobKind, method: str, req, *, timeout_s: float | None = None):
        try:
            return getattr(self.stub(kind), method)(
                req, timeout=timeout_s or self.timeout_s, metadata=call_metadata()
            )
        except grpc.RpcError as err:
            raise HTTPError.from_service_error(_named(from_rpc_error(err), kind)) from None

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


def _named(err, kind: JobKind):
    if err.code == grpc.StatusCode.UNAVAILABLE and kind.service not in err.message:
        err.message = f"the {kind.service} service is unavailable: {err.message}"
    return err


def _kind(name: str) -> JobKind:
    if name not in KINDS:
        raise HTTPError(404, f"unknown job kind {name!r}; one of: {', '.join(KINDS)}", "kind")
    return KINDS[name]


def _list_request(kind: JobKind):
    args = request.args
    limit = args.get("limit", "50")
    try:
        limit_n = int(limit)
    except ValueError:
        raise HTTPError(400, f"limit must be an integer, got {limit!r}", "limit") from None
    if not 1 <= limit_n <= 1000:
        raise HTTPError(400, f"limit must be in 1..1000, got {limit_n}", "limit")
    state = args.get("state", "")
    if state and state not in STATES:
        raise HTTPError(400, f"state must be one of {', '.join(STATES)}, got {state!r}", "state")
    req = getattr(kind.module, f"List{kind.plural}Request")(limit=limit_n, state=STATES.get(state, 0))
    return req, limit_n


class JobList(Resource):
    def __init__(self, clients: JobClients) -> None:
        self.clients = clients

    def get(self, kind: str | None = None):
        kinds = [kind] if kind else list(KINDS)
        jobs, unavailable = [], {}
        limit = 50
        for name in kinds:
            k = _kind(name)
            req, limit = _list_request(k)
            try:
                resp = self.clients.call(k, f"List{k.plural}", req)
            except HTTPError as e:
                if kind or e.status != 503:  # one kind asked for: its error is the answer
                    raise
                unavailable[name] = e.message
                continue
            jobs += [{"kind": name, **to_json(job)} for job in getattr(resp, k.list_field)]
        jobs.sort(key=lambda d: d.get("status", {}).get("created_unix_s", 0), reverse=True)
        body: dict[str, Any] = {"jobs": jobs[:limit]}
        if unavailable:
            body["unavailable"] = unavailable
        return json_response(body)

    def post(self, kind: str):
        k = _kind(kind)
        doc = json_body()
        if "spec" not in doc:
            raise HTTPError(
                400, f"body must have a 'spec' object (the {k.noun} spec in the protos' JSON mapping)", "spec"
            )
        req = getattr(k.module, f"Submit{k.noun}Request")()
        try:
            json_format.ParseDict(doc, req)
        except json_format.ParseError as e:
            raise HTTPError(400, f"bad {kind} request: {e}", _field_of(str(e))) from None
        resp = self.clients.call(k, f"Submit{k.noun}", req)
        return json_response(
            {"kind": kind, "job_id": resp.job_id}, 201, {"Location": f"/v1/jobs/{kind}/{resp.job_id}"}
        )


def _field_of(message: str) -> str | None:
    """The field json_format names: 'Failed to parse spec field: Failed to parse x field: ...' (x) /
    'Message type ... has no field named "x"'."""
    m = re.search(r'no field named "([^"]+)"', message)
    if m:
        return m.group(1)
    nested = re.findall(r"Failed to parse (\w+) field", message)  # outermost first: the innermost is at fault
    return nested[-1] if nested else None


class JobItem(Resource):
    def __init__(self, clients: JobClients) -> None:
        self.clients = clients

    def get(self, kind: str, job_id: str):
        k = _kind(kind)
        resp = self.clients.call(k, f"Get{k.noun}", getattr(k.module, f"Get{k.noun}Request")(job_id=job_id))
        return json_response({"kind": kind, **to_json(getattr(resp, k.field))})


class JobCancel(Resource):
    def __init__(self, clients: JobClients) -> None:
        self.clients = clients

    def post(self, kind: str, job_id: str):
        k = _kind(kind)
        reason = "cancelled through the gateway"
        if request.get_data(cache=True):
            given = json_body().get("reason", reason)
            if not isinstance(given, str):
                raise HTTPError(400, "reason must be a string", "reason")
            reason = given or reason
        resp = self.clients.call(
            k, f"Cancel{k.noun}", getattr(k.module, f"Cancel{k.noun}Request")(job_id=job_id, reason=reason)
        )
        return json_response({"kind": kind, **to_json(getattr(resp, k.field))})


class JobEvents(Resource):
    """Server-sent events: one `data:` line with the job each time it changes; the stream ends with the
    job."""

    def __init__(self, clients: JobClients) -> None:
        self.clients = clients

    def get(self, kind: str, job_id: str):
        k = _kind(kind)
        stub = self.clients.stub(k)
        watchers = self.clients.watchers  # one gateway thread per open stream: bounded, 429 beyond
        try:
            watchers.acquire()
        except ResourceExhausted as e:
            raise HTTPError.from_service_error(e) from None
        try:
            call = getattr(stub, f"Watch{k.noun}")(
                getattr(k.module, f"Watch{k.noun}Request")(job_id=job_id), metadata=call_metadata()
            )
            try:  # the first event is read here so that an unknown job is a 404, not a broken stream
                first = next(call)
            except StopIteration:
                first = None
            except grpc.RpcError as err:
                raise HTTPError.from_service_error(_named(from_rpc_error(err), k)) from None
        except BaseException:
            watchers.release()
            raise

        def events() -> Iterator[str]:
            try:
                if first is not None:
                    yield sse({"kind": kind, **to_json(getattr(first, k.field))})
                for ev in call:
                    yield sse({"kind": kind, **to_json(getattr(ev, k.field))})
            except grpc.RpcError as err:
                e = from_rpc_error(err)
                yield sse(stream_error(e))
            finally:
                call.cancel()  # the HTTP client left: stop watching
                watchers.release()

        return Response(stream_with_context(events()), mimetype="text/event-stream", headers=SSE_HEADERS)


class TrainingLogs(Resource):
    def __init__(self, clients: JobClients) -> None:
        self.clients = clients

    def get(self, job_id: str):
        k = KINDS["training"]
        stub = self.clients.stub(k)
        try:
            lines = [
                line
                for chunk in stub.GetTrainJobLogs(
                    trainer_pb2.GetTrainJobLogsRequest(job_id=job_id, follow=False),
                    timeout=self.clients.timeout_s,
                    metadata=call_metadata(),
                )
                for line in chunk.lines
            ]
        except grpc.RpcError as err:
            raise HTTPError.from_service_error(_named(from_rpc_error(err), k)) from None
        if request.args.get("format") == "text":
            return Response("".join(line + "\n" for line in lines), mimetype="text/plain")
        return json_response({"job_id": job_id, "lines": lines})


class TrainingEvaluations(Resource):
    """The checkpoints a training job's ``evaluate`` asked for, each with its state and scores; ``final`` once
    the job has ended and every row is succeeded or failed."""

    def __init__(self, clients: JobClients) -> None:
        self.clients = clients

    def get(self, job_id: str):
        k = KINDS["training"]
        job = self.clients.call(k, "GetTrainJob", trainer_pb2.GetTrainJobRequest(job_id=job_id)).job
        return json_response(
            {
                "job_id": job_id,
                "evaluate": to_json(job.spec.evaluate) if job.spec.HasField("evaluate") else None,
                "final": job.evaluations_final,
                "evaluations": [to_json(e) for e in job.evaluations],
            }
        )


def register(api, clients: JobClients) -> None:
    args = (clients,)
    api.add_resource(JobList, "/v1/jobs", "/v1/jobs/<string:kind>", resource_class_args=args)
    api.add_resource(JobItem, "/v1/jobs/<string:kind>/<string:job_id>", resource_class_args=args)
    api.add_resource(JobCancel, "/v1/jobs/<string:kind>/<string:job_id>/cancel", resource_class_args=args)
    api.add_resource(JobEvents, "/v1/jobs/<string:kind>/<string:job_id>/events", resource_class_args=args)
    api.add_resource(TrainingLogs, "/v1/jobs/training/<string:job_id>/logs", resource_class_args=args)
    api.add_resource(
        TrainingEvaluations, "/v1/jobs/training/<string:job_id>/evaluations", resource_class_args=args
    )
