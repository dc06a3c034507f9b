"""python -m services.converter: checkpoint conversion jobs over gRPC."""

from __future__ import annotations

import logging

from protos.converter.v1 import converter_pb2_grpc as pb_grpc
from services.converter.config import ConverterConfig
from services.converter.servicer import ConverterServicer
from shared.grpc.server import Registration
from shared.jobs import JobStore
from shared.service import ServiceParts, run_service

SERVICE = "megastack.converter.v1.ConverterService"
logger = logging.getLogger(__name__)


def build(cfg: ConverterConfig) -> ServiceParts:
    store = JobStore(
        cfg.jobs_dir,
        "convert",
        max_watchers=cfg.watchers_limit,
        watchers_setting="MEGASTACK_CONVERTER_MAX_WATCHERS",
    )
    lost = store.recover(
        "the converter restarted while this conversion was running; its partial output was discarded"
    )
    if lost:
        logger.warning("marked %d interrupted conversions as failed", len(lost))
    servicer = ConverterServicer(store, max_concurrent=cfg.max_concurrent, cancel_grace_s=cfg.cancel_grace_s)
    return ServiceParts(
        registrations=[Registration(pb_grpc.add_ConverterServiceServicer_to_server, servicer, SERVICE)],
        on_shutdown=[servicer.runner.shutdown],
    )


if __name__ == "__main__":
    run_service("converter", ConverterConfig, build)
