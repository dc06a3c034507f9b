"""python -m services.textgen: serve a checkpoint with continuous batching over gRPC."""

from __future__ import annotations

from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc
from services.textgen.config import TextgenConfig
from services.textgen.loader import load_served_model
from services.textgen.servicer import TextGenServicer
from services.textgen.warmup import warmup
from services.textgen.watchdog import Watchdog
from shared.grpc.server import Registration
from shared.service import ServiceParts, run_service

SERVICE = "megastack.textgen.v1.TextGenService"


def build(cfg: TextgenConfig) -> ServiceParts:
    from services.textgen import metrics as M

    M.QUEUE_CAPACITY.set(cfg.max_queue_size)
    M.BATCH_CAPACITY.set(cfg.max_batch_size)
    served = load_served_model(cfg)
    M.KV_CACHE_BLOCKS.set(served.engine.pool.usable)
    M.KV_CACHE_BLOCK_SIZE.set(served.engine.pool.block_size)
    M.bind_model(served.name)  # the model_name label of the vllm:* twins
    warmup(served)
    servicer = TextGenServicer(
        served,
        max_prompts=cfg.max_prompts_per_request,
        max_queue_size=cfg.max_queue_size,
        max_batch_size=cfg.max_batch_size,
    )
    parts = ServiceParts(
        registrations=[Registration(pb_grpc.add_TextGenServiceServicer_to_server, servicer, SERVICE)],
        on_shutdown=[served.engine.stop],
        main_loop=served.engine.run,
    )

    def start_watchdog(server) -> None:
        dog = Watchdog(served, server.set_serving, cfg.watchdog_s)
        dog.start()
        parts.on_shutdown.insert(0, dog.stop)

    parts.on_started.append(start_watchdog)
    return parts


if __name__ == "__main__":
    run_service("textgen", TextgenConfig, build)
