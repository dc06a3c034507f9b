"""gateway settings (environment variables MEGASTACK_GATEWAY_*)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import setting


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    host: str = setting("127.0.0.1", help="HTTP bind address (127.0.0.1 unless told otherwise).")
    port: int = setting(5000, help="HTTP port (Megatron's default 5000); 0 picks a free port.")
    textgen_addrs: tuple[str, ...] = setting(("127.0.0.1:50051",), help="Comma-separated textgen replicas (host:port).")
    converter_addr: str = setting("127.0.0.1:50052", help="converter gRPC address, behind /v1/jobs/conversions; empty = not deployed (503).")
    trainer_addr: str = setting("127.0.0.1:50053", help="trainer gRPC address, behind /v1/jobs/training; empty = not deployed (503).")
    evaluator_addr: str = setting("127.0.0.1:50054", help="evaluator gRPC address, behind /v1/jobs/evaluations; empty = not deployed (503).")
    api_keys: tuple[str, ...] = setting((), help="Comma-separated API keys; when set, requests need `Authorization: Bearer <key>` (or the bare key).")
    max_body_bytes: int = setting(16 * 1024 * 1024, help="Largest accepted request body (413 above).")
    request_timeout_s: float = setting(600.0, help="Deadline of one generation call to textgen.")
    health_interval_s: float = setting(1.0, help="Seconds between gRPC health checks of each replica.")
    ready_timeout_s: float = setting(30.0, help="Deadline of the 1-token generation behind GET /ready.")
    log_level: str = setting("INFO", help="Logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_json: bool = setting(False, help="Log JSON lines instead of text.")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not self.textgen_addrs:
            raise ValueError("textgen_addrs must name at least one replica")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be > 0")
