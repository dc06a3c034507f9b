"""ConverterService over real gRPC, with real worker processes."""

from __future__ import annotations

import grpc
import pytest

from protos.common.v1 import common_pb2
from protos.converter.v1 import converter_pb2 as pb
from protos.converter.v1 import converter_pb2_grpc as pb_grpc
from shared.grpc.channel import make_channel
from tests.fixtures.servers import start_converter
from tests.integration.converter.conftest import leftovers


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    servicer, server = start_converter(tmp_path_factory.mktemp("jobs"))
    yield server.address
    servicer.runner.shutdown()
    server.stop(0)


@pytest.fixture(scope="module")
def stub(address):
    with make_channel(address) as ch:
        yield pb_grpc.ConverterServiceStub(ch)


def spec(src, dst, fmt=common_pb2.CHECKPOINT_FORMAT_MCORE, **kw):
    return pb.ConversionSpec(load_dir=str(src), save_dir=str(dst), target_format=fmt, **kw)


def follow(stub, job_id):
    events = list(stub.WatchConversion(pb.WatchConversionRequest(job_id=job_id), timeout=300))
    return events


def test_submit_watch_get_list(stub, tiny_models, tmp_path):
    job_id = stub.SubmitConversion(
        pb.SubmitConversionRequest(
            spec=spec(tiny_models["gpt2"], tmp_path / "out", verify=True), labels={"who": "test"}
        )
    ).job_id
    events = follow(stub, job_id)
    final = events[-1].conversion
    assert final.status.state == common_pb2.JOB_STATE_SUCCEEDED, final.status.error
    assert final.status.progress.total > 0 and final.status.progress.done == final.status.progress.total
    assert final.result.parity.max_abs_logit_diff <= 1e-5 and final.result.parity.weights_exact
    layers = final.result.parity.layers  # the per-layer report travels in the job's result
    assert [x.name for x in layers] == ["embedding", "after layer 1", "final norm"]
    assert final.result.parity.first_layer_over == "" and final.result.parity.tolerance == 1e-4
    assert "top-1 agreement" in final.result.summary and any(
        "tensors" in line for e in events for line in e.log_lines
    )
    got = stub.GetConversion(pb.GetConversionRequest(job_id=job_id)).conversion
    assert got.status.labels["who"] == "test" and (tmp_path / "out" / "release").is_dir()
    listed = stub.ListConversions(pb.ListConversionsRequest(state=common_pb2.JOB_STATE_SUCCEEDED)).conversions
    assert job_id in [c.status.job_id for c in listed]


@pytest.mark.parametrize(
    "make,code,fragment",
    [
        (lambda m, t: spec(m, t, fmt=0), grpc.StatusCode.INVALID_ARGUMENT, "target_format is required"),
        (lambda m, t: spec(t / "missing", t / "o"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        (
            lambda m, t: spec(m, t / "o", target_tensor_parallel_size=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TP=3 does not divide",
        ),
        (lambda m, t: spec(m, t), grpc.StatusCode.ALREADY_EXISTS, "already exists"),
        (
            lambda m, t: spec(m, t / "o", source=pb.SourceExpectation(num_layers=7)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "said to have num_layers 7, but",
        ),
    ],
)
def test_bad_specs_are_refused_before_a_job_exists(stub, tiny_models, tmp_path, make, code, fragment):
    before = len(stub.ListConversions(pb.ListConversionsRequest()).conversions)
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitConversion(pb.SubmitConversionRequest(spec=make(tiny_models["llama"], tmp_path)))
    assert e.value.code() == code and fragment in e.value.details()
    assert len(stub.ListConversions(pb.ListConversionsRequest()).conversions) == before


def test_validate_only_checks_like_a_submit_and_creates_nothing(stub, address, tiny_models, tmp_path, capsys):
    before = len(stub.ListConversions(pb.ListConversionsRequest()).conversions)
    ok = stub.SubmitConversion(
        pb.SubmitConversionRequest(spec=spec(tiny_models["llama"], tmp_path / "o"), validate_only=True)
    )
    assert ok.job_id == "" and not (tmp_path / "o").exists()
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitConversion(
            pb.SubmitConversionRequest(
                spec=spec(tiny_models["llama"], tmp_path / "o", target_tensor_parallel_size=3),
                validate_only=True,
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "TP=3 does not divide" in e.value.details()
    from tools.cli.main import main

    argv = ["convert", "--load-dir", str(tiny_models["llama"]), "--save-dir", str(tmp_path / "o")]
    argv += ["--target-format", "mcore", "--dry-run"]
    assert main([*argv, "--server", address]) == 0
    assert "valid (checked by the converter service; nothing submitted)" in capsys.readouterr().out
    assert main(argv) == 0  # here: the checks convert() makes before it writes
    assert "valid (nothing written)" in capsys.readouterr().out
    assert main([*argv, "--target-tensor-parallel-size", "3", "--server", address]) == 2
    assert "TP=3 does not divide" in capsys.readouterr().err
    assert len(stub.ListConversions(pb.ListConversionsRequest()).conversions) == before
    assert not (tmp_path / "o").exists()


def test_same_request_id_returns_the_same_job(stub, tiny_models, tmp_path):
    req = pb.SubmitConversionRequest(
        spec=spec(tiny_models["qwen2"], tmp_path / "o", fmt=common_pb2.CHECKPOINT_FORMAT_LEGACY),
        request_id="abc-1",
    )
    a = stub.SubmitConversion(req).job_id
    b = stub.SubmitConversion(req).job_id
    assert a == b
    assert follow(stub, a)[-1].conversion.status.state == common_pb2.JOB_STATE_SUCCEEDED


def test_cancel_mid_run_leaves_nothing_at_the_target(stub, default_model_dir, tmp_path):
    target = tmp_path / "big"
    job_id = stub.SubmitConversion(
        pb.SubmitConversionRequest(spec=spec(default_model_dir, target, verify=True))
    ).job_id
    for ev in stub.WatchConversion(pb.WatchConversionRequest(job_id=job_id), timeout=300):
        if ev.conversion.status.progress.message.startswith("verifying"):
            break
    done = stub.CancelConversion(
        pb.CancelConversionRequest(job_id=job_id, reason="changed my mind")
    ).conversion
    assert done.status.state == common_pb2.JOB_STATE_CANCELLED and done.status.error == "changed my mind"
    assert not target.exists() and leftovers(tmp_path) == []
    with pytest.raises(grpc.RpcError) as e:
        stub.CancelConversion(pb.CancelConversionRequest(job_id=job_id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
