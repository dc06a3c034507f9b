"""python -m services.evaluator: lm-evaluation-harness runs against served models, over gRPC."""

from __future__ import annotations

import logging

from protos.evaluator.v1 import evaluator_pb2_grpc as pb_grpc
from services.evaluator.config import EvaluatorConfig
from services.evaluator.servicer import EvaluatorServicer
from shared.grpc.server import Registration
from shared.jobs import JobStore
from shared.service import ServiceParts, run_service

SERVICE = "megastack.evaluator.v1.EvaluatorService"
logger = logging.getLogger(__name__)


def build(cfg: EvaluatorConfig) -> ServiceParts:
    store = JobStore(
        cfg.jobs_dir,
        "eval",
        max_watchers=cfg.watchers_limit,
        watchers_setting="MEGASTACK_EVALUATOR_MAX_WATCHERS",
    )
    lost = store.recover(
        "the evaluator restarted while this run was going; its progress and log are kept; submit it again "
        "to rerun"
    )
    if lost:
        logger.warning("marked %d interrupted evaluations as failed", len(lost))
    servicer = EvaluatorServicer(
        store,
        max_concurrent=cfg.max_concurrent,
        include_paths=cfg.include_paths,
        request_cache=cfg.jobs_dir / "request-cache.sqlite" if cfg.request_cache else None,
    )
    return ServiceParts(
        registrations=[Registration(pb_grpc.add_EvaluatorServiceServicer_to_server, servicer, SERVICE)],
        on_shutdown=[servicer.runner.shutdown],
    )


if __name__ == "__main__":
    run_service("evaluator", EvaluatorConfig, build)
