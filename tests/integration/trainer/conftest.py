"""A real local Ray head, a tiny converted model, a tiny dataset, and the trainer service over gRPC."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.fixtures import tiny


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    from tools.stack import Stack
    from tools.stack import ray_head as make_head

    run_dir = tmp_path_factory.mktemp("ray")
    proc = make_head(run_dir, free_ports=True, num_cpus=2)
    stack = Stack(run_dir, [proc])
    import os

    stack.start_one(proc, {**os.environ})
    stack.wait_healthy(proc, timeout_s=120)
    yield proc.endpoints["dashboard"]
    stack.stop_one(proc)


@pytest.fixture(scope="session")
def train_assets(tmp_path_factory, tiny_tokenizer):
    from services.converter.conversion import ConvertSpec, convert
    from tools.preprocess.pipeline import Options, run

    root = tmp_path_factory.mktemp("train")
    hf = tiny.make_tiny_hf("llama", root / "hf", tiny_tokenizer, num_hidden_layers=4)
    convert(ConvertSpec(load_dir=hf, save_dir=root / "mcore", target_format="mcore", tp=2))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny.corpus_lines(3000)))
    run(Options(input=corpus, output_prefix=str(root / "data"), tokenizer_name_or_path=tiny_tokenizer, append_eod=True))
    return {"root": root, "hf": hf, "mcore": root / "mcore", "data": str(root / "data_text_document")}


def spec_doc(assets, save_dir: Path, **over) -> dict:
    doc = {
        "name": "tiny", "kind": "pretrain",
        "model": {"init_from": str(assets["mcore"])},
        "data": {"paths": [{"prefix": assets["data"], "weight": 1.0}], "seq_length": 64},
        "parallel": {"tensor_parallel": 2},
        "optimizer": {"lr": 0.002, "lr_warmup_iters": 2},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 20, "log_interval": 1},
        "checkpoint": {"save_dir": str(save_dir), "save_interval": 5},
    }
    for section, values in over.items():
        doc[section] = {**doc.get(section, {}), **values} if isinstance(values, dict) else values
    return doc


@pytest.fixture(scope="module")
def trainer(ray_head, tmp_path_factory):
    """(stub, store, launcher) of an in-process trainer service on port 0."""
    from protos.trainer.v1 import trainer_pb2_grpc as pb_grpc
    from services.trainer.__main__ import SERVICE
    from services.trainer.launcher import RayLauncher
    from services.trainer.servicer import TrainerServicer
    from shared.grpc.channel import make_channel
    from shared.grpc.server import Registration, build_server
    from shared.jobs import JobStore

    store = JobStore(tmp_path_factory.mktemp("trainer-jobs"), "train")
    launcher = RayLauncher(store, ray_address=ray_head, poll_interval_s=0.5)
    launcher.start()
    server = build_server(service="trainer", registrations=[Registration(pb_grpc.add_TrainerServiceServicer_to_server,
                          TrainerServicer(store, launcher), SERVICE)], host="127.0.0.1", port=0, max_workers=8)
    server.start()
    server.set_serving(True)
    with make_channel(server.address) as ch:
        yield pb_grpc.TrainerServiceStub(ch), store, launcher
    launcher.stop()
    server.stop(0)


def curve(save_dir: Path) -> dict[int, float]:
    """step -> loss, the last value written for each step (a resumed attempt rewrites its steps)."""
    out = {}
    for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "loss" in d and not d.get("done"):
            out[d["step"]] = d["loss"]
    return out


def wait_for(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)
