"""A real local Ray head and the trainer service over gRPC (the tiny model and data: tests/conftest.py
train_assets)."""

from __future__ import annotations

import pytest


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
    server = build_server(
        service="trainer",
        registrations=[
            Registration(
                pb_grpc.add_TrainerServiceServicer_to_server, TrainerServicer(store, launcher), SERVICE
            )
        ],
        host="127.0.0.1",
        port=0,
        max_workers=8,
    )
    server.start()
    server.set_serving(True)
    with make_channel(server.address) as ch:
        yield pb_grpc.TrainerServiceStub(ch), store, launcher
    launcher.stop()
    server.stop(0)
