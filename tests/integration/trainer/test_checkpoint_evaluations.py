"""A training run that scores its own checkpoints: a real Ray job, the converter exporting each chosen
checkpoint to HF, the evaluator running lm-eval on it, the leaderboard from the CLI and the gateway."""

from __future__ import annotations

import json

import grpc
import pytest
import requests

from protos.evaluator.v1 import evaluator_pb2 as epb
from protos.evaluator.v1 import evaluator_pb2_grpc as epb_grpc
from protos.trainer.v1 import trainer_pb2 as pb
from protos.trainer.v1 import trainer_pb2_grpc as pb_grpc
from services.trainer.wire import spec_from_dict, spec_to_pb
from shared.grpc.channel import make_channel
from tests.fixtures.servers import serve, start_converter, start_evaluator, start_gateway
from tests.fixtures.training import spec_doc

EVALUATE = {"tasks": ["megastack_capitals"], "limit": 4, "every_n_saves": 1}


@pytest.fixture(scope="module")
def services(ray_head, tmp_path_factory, textgen):
    """A trainer that exports and scores checkpoints through a converter and an evaluator, and a gateway."""
    from services.trainer.__main__ import SERVICE
    from services.trainer.evaluations import CheckpointEvaluations
    from services.trainer.launcher import RayLauncher
    from services.trainer.servicer import TrainerServicer
    from shared.jobs import JobStore

    conv, conv_server = start_converter(tmp_path_factory.mktemp("convert-jobs"))
    ev, ev_server = start_evaluator(tmp_path_factory.mktemp("eval-jobs"))
    store = JobStore(tmp_path_factory.mktemp("trainer-jobs"), "train")
    launcher = RayLauncher(store, ray_address=ray_head, poll_interval_s=0.5)
    evaluations = CheckpointEvaluations(
        store, converter_addr=conv_server.address, evaluator_addr=ev_server.address, poll_interval_s=0.5
    )
    launcher.start()
    evaluations.start()
    server = serve(
        "trainer",
        pb_grpc.add_TrainerServiceServicer_to_server,
        TrainerServicer(store, launcher, evaluations),
        SERVICE,
    )
    gw = start_gateway((textgen.address,), trainer_addr=server.address, evaluator_addr=ev_server.address)
    yield server.address, ev_server.address, gw
    gw.stop()
    evaluations.stop()
    launcher.stop()
    server.stop(0)
    for servicer, srv in ((conv, conv_server), (ev, ev_server)):
        servicer.runner.shutdown()
        srv.stop(0)


def test_each_saved_checkpoint_is_exported_scored_and_on_the_leaderboard(
    services, train_assets, tmp_path, capsys
):
    from tools.cli.main import main

    trainer_addr, evaluator_addr, gw = services
    doc = spec_doc(
        train_assets,
        tmp_path / "run",
        training={"train_iters": 10},
        checkpoint={"save_interval": 5},
        evaluate=EVALUATE,
    )
    with make_channel(trainer_addr) as ch:
        stub = pb_grpc.TrainerServiceStub(ch)
        job_id = stub.SubmitTrainJob(pb.SubmitTrainJobRequest(spec=spec_to_pb(spec_from_dict(doc)))).job_id
    # the CLI waits for the job and every checkpoint's evaluation, then prints the rows
    board = ["eval", "leaderboard", "--training-job", job_id, "--trainer", trainer_addr]
    assert main([*board, "--wait-s", "600", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [r["step"] for r in rows] == [5, 10], rows
    assert all(r["state"] == "succeeded" for r in rows), rows
    for r in rows:
        acc = r["scores"]["megastack_capitals"]["acc,none"]
        assert 0.0 <= acc <= 1.0
        hf = tmp_path / "run" / "hf-evaluations" / f"iter_{r['step']:07d}"
        assert r["hf_dir"] == str(hf) and (hf / "config.json").is_file()
    assert not list((tmp_path / "run").glob(".megastack-hold-*"))  # every hold released
    # the evaluator's own records: the export of that step, the spec's tasks and limit, labelled with the job
    with make_channel(evaluator_addr) as ch:
        estub = epb_grpc.EvaluatorServiceStub(ch)
        for r in rows:
            ev = estub.GetEvaluation(epb.GetEvaluationRequest(job_id=r["evaluation_job_id"])).evaluation
            assert ev.spec.hf_checkpoint == r["hf_dir"] and list(ev.spec.tasks) == ["megastack_capitals"]
            assert ev.spec.limit == 4 and ev.result.tasks[0].num_samples == 4
            assert dict(ev.result.tasks[0].metrics) == r["scores"]["megastack_capitals"]
            assert ev.status.labels["training_job"] == job_id and ev.status.labels["step"] == str(r["step"])
    # the two checkpoints are different models: the exports differ
    from llm.checkpoints import open_checkpoint

    a, b = (open_checkpoint(r["hf_dir"]) for r in rows)
    assert not (a.get("decoder.final_layernorm.weight") == b.get("decoder.final_layernorm.weight")).all()

    assert main(board) == 0
    printed = capsys.readouterr().out
    with capsys.disabled():  # into the test log: the leaderboard of a real training run
        print(f"\nmegastack eval leaderboard --training-job {job_id}\n{printed}")
    table = printed.splitlines()
    assert table[0].split() == ["step", "state", "megastack_capitals", "acc_norm"]  # the headline metric
    assert [line.split()[:2] for line in table[1:]] == [["5", "succeeded"], ["10", "succeeded"]]
    assert (
        main(["eval", "leaderboard", "--training-job", job_id, "--trainer", trainer_addr, "--format", "csv"])
        == 0
    )
    import csv

    got = list(csv.reader(capsys.readouterr().out.splitlines()))
    assert got[0][:3] == ["step", "state", "megastack_capitals/acc,none"] and len(got) == 3
    col = got[0].index("megastack_capitals/acc_norm,none")
    assert [float(line[col]) for line in got[1:]] == [
        r["scores"]["megastack_capitals"]["acc_norm,none"] for r in rows
    ]

    body = requests.get(f"{gw.url}/v1/jobs/training/{job_id}/evaluations", timeout=30).json()
    assert body["final"] is True and body["evaluate"]["tasks"] == ["megastack_capitals"]
    assert [(e["step"], e["state"], e["evaluation_job_id"]) for e in body["evaluations"]] == [
        (r["step"], r["state"], r["evaluation_job_id"]) for r in rows
    ]
    assert body["evaluations"][0]["scores"][0]["metrics"] == rows[0]["scores"]["megastack_capitals"]
    missing = requests.get(f"{gw.url}/v1/jobs/training/train-nope/evaluations", timeout=30)
    assert missing.status_code == 404 and "train-nope" in missing.json()["message"]


def test_evaluate_is_refused_at_submit_without_the_services_or_without_tasks(
    trainer, services, train_assets, tmp_path
):
    plain_stub, _, _ = trainer  # a trainer with no converter / evaluator configured
    trainer_addr, _, _ = services
    cases = [
        (plain_stub, EVALUATE, grpc.StatusCode.FAILED_PRECONDITION, "evaluate"),
        (None, {"limit": 4}, grpc.StatusCode.INVALID_ARGUMENT, "evaluate.tasks"),
        (None, {**EVALUATE, "limit": -1}, grpc.StatusCode.INVALID_ARGUMENT, "evaluate.limit"),
    ]
    with make_channel(trainer_addr) as ch:
        for stub, evaluate, code, field in cases:
            stub = stub or pb_grpc.TrainerServiceStub(ch)
            spec = spec_to_pb(spec_from_dict(spec_doc(train_assets, tmp_path / "run", evaluate=evaluate)))
            with pytest.raises(grpc.RpcError) as e:
                stub.SubmitTrainJob(pb.SubmitTrainJobRequest(spec=spec, validate_only=True))
            assert e.value.code() == code and field in e.value.details(), e.value.details()
    assert not (tmp_path / "run").exists()
