"""Watch streams cannot starve a service: beyond the bound a new watcher is refused at once (gRPC
RESOURCE_EXHAUSTED, HTTP 429) while submissions and lists still answer; closed streams free their slots."""

from __future__ import annotations

import time

import grpc
import pytest
import requests

from protos.converter.v1 import converter_pb2 as pb
from protos.converter.v1 import converter_pb2_grpc as pb_grpc
from services.converter.__main__ import SERVICE
from services.converter.servicer import ConverterServicer
from shared.grpc.channel import make_channel
from shared.grpc.server import Registration, build_server
from shared.jobs import JobStore
from tests.fixtures.servers import start_gateway

GRPC_BOUND, HTTP_BOUND = 4, 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory, textgen):
    store = JobStore(
        tmp_path_factory.mktemp("jobs"),
        "convert",
        max_watchers=GRPC_BOUND,
        watchers_setting="MEGASTACK_CONVERTER_MAX_WATCHERS",
    )
    servicer = ConverterServicer(store, max_concurrent=1, cancel_grace_s=10)
    server = build_server(
        service="converter",
        registrations=[Registration(pb_grpc.add_ConverterServiceServicer_to_server, servicer, SERVICE)],
        host="127.0.0.1",
        port=0,
        max_workers=GRPC_BOUND + 4,
    )
    server.start()
    server.set_serving(True)
    # a job that never runs: watching it blocks until the watcher leaves
    from pathlib import Path

    from services.converter.conversion import ConvertSpec
    from services.converter.wire import spec_record

    spec = ConvertSpec(load_dir=Path("/x"), save_dir=Path("/y"), target_format="mcore")
    rec, _ = store.create(spec_record(spec), labels={}, request_id="")
    gw = start_gateway(
        (textgen.address,),
        converter_addr=server.address,
        trainer_addr="",
        evaluator_addr="",
        max_watchers=HTTP_BOUND,
    )
    with make_channel(server.address) as ch:
        yield pb_grpc.ConverterServiceStub(ch), gw, rec.job_id, store
    gw.stop()
    servicer.runner.shutdown()
    server.stop(0)


def test_grpc_watchers_beyond_the_bound_are_refused_and_the_service_still_answers(stack):
    stub, _, job_id, store = stack
    calls, refused = [], []
    for _ in range(GRPC_BOUND + 10):
        call = stub.WatchConversion(pb.WatchConversionRequest(job_id=job_id), timeout=60)
        try:
            next(call)
            calls.append(call)
        except grpc.RpcError as e:
            refused.append(e)
    assert len(calls) == GRPC_BOUND and len(refused) == 10
    assert all(
        e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "MEGASTACK_CONVERTER_MAX_WATCHERS" in e.details()
        for e in refused
    )
    t0 = time.monotonic()
    assert stub.ListConversions(pb.ListConversionsRequest(), timeout=10).conversions
    with pytest.raises(grpc.RpcError) as e:  # a submission is served (and judged), not starved
        stub.SubmitConversion(pb.SubmitConversionRequest(spec=pb.ConversionSpec()), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and time.monotonic() - t0 < 5
    for c in calls:
        c.cancel()
    deadline = time.monotonic() + 10
    while store.watchers.open and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.watchers.open == 0
    again = stub.WatchConversion(pb.WatchConversionRequest(job_id=job_id), timeout=60)
    next(again)
    again.cancel()


def test_sse_watchers_beyond_the_bound_get_429_and_submissions_still_answer(stack):
    _, gw, job_id, store = stack
    url = f"{gw.url}/v1/jobs/conversions/{job_id}/events"
    held, statuses = [], []
    try:
        for _ in range(HTTP_BOUND + 10):
            r = requests.get(url, stream=True, timeout=30)
            statuses.append(r.status_code)
            if r.status_code == 200:
                next(r.iter_lines())  # the first event: the stream is open and holds its slot
                held.append(r)
            else:
                assert (
                    r.headers.get("Retry-After") == "1"
                    and "MEGASTACK_GATEWAY_MAX_WATCHERS" in r.json()["message"]
                )
        assert statuses.count(200) == HTTP_BOUND and statuses.count(429) == 10, statuses
        r = requests.post(f"{gw.url}/v1/jobs/conversions", json={"spec": {"load_dir": "/x"}}, timeout=10)
        assert r.status_code == 400
        assert requests.get(f"{gw.url}/v1/jobs/conversions", timeout=10).status_code == 200
    finally:
        for r in held:
            r.close()
