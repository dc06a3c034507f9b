"""python -m services.trainer: megatron-core training jobs on a Ray cluster, over gRPC."""

from __future__ import annotations

import json
import logging

from protos.trainer.v1 import trainer_pb2_grpc as pb_grpc
from services.trainer.config import TrainerConfig
from services.trainer.evaluations import CheckpointEvaluations
from services.trainer.launcher import RayLauncher
from services.trainer.servicer import TrainerServicer
from shared.grpc.server import Registration
from shared.jobs import JobStore
from shared.service import ServiceParts, run_service

SERVICE = "megastack.trainer.v1.TrainerService"
logger = logging.getLogger(__name__)


def build(cfg: TrainerConfig) -> ServiceParts:
    store = JobStore(
        cfg.jobs_dir,
        "train",
        max_watchers=cfg.watchers_limit,
        watchers_setting="MEGASTACK_TRAINER_MAX_WATCHERS",
    )
    launcher = RayLauncher(
        store,
        ray_address=cfg.ray_address,
        python=cfg.python,
        runtime_env=json.loads(cfg.runtime_env_json) if cfg.runtime_env_json else None,
        poll_interval_s=cfg.poll_interval_s,
        ray_poll_interval_s=cfg.ray_poll_interval_s,
        resource_wait_s=cfg.resource_wait_s,
    )
    active = [r.job_id for r in store.list() if not r.terminal]
    if active:
        logger.info(
            "following %d unfinished jobs from before the restart: %s", len(active), ", ".join(active)
        )
    evaluations = CheckpointEvaluations(
        store,
        converter_addr=cfg.converter_addr,
        evaluator_addr=cfg.evaluator_addr,
        poll_interval_s=cfg.poll_interval_s,
    )
    launcher.start()
    evaluations.start()
    return ServiceParts(
        registrations=[
            Registration(
                pb_grpc.add_TrainerServiceServicer_to_server,
                TrainerServicer(store, launcher, evaluations),
                SERVICE,
            )
        ],
        on_shutdown=[launcher.stop, evaluations.stop],
    )


if __name__ == "__main__":
    run_service("trainer", TrainerConfig, build)
