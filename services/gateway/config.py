"""gateway settings (environment variables MEGASTACK_GATEWAY_*)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from shared.config import setting, watch_limit


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    host: str = setting("127.0.0.1", help="HTTP bind address (127.0.0.1 unless told otherwise).")
    port: int = setting(5000, help="HTTP port (Megatron's default 5000); 0 picks a free port.")
    textgen_addrs: tuple[str, ...] = setting(
        ("127.0.0.1:50051",), help="Comma-separated textgen replicas (host:port)."
    )
    converter_addr: str = setting(
        "127.0.0.1:50052",
        help="converter gRPC address, behind /v1/jobs/conversions; empty = not deployed (503).",
    )
    trainer_addr: str = setting(
        "127.0.0.1:50053", help="trainer gRPC address, behind /v1/jobs/training; empty = not deployed (503)."
    )
    evaluator_addr: str = setting(
        "127.0.0.1:50054",
        help="evaluator gRPC address, behind /v1/jobs/evaluations; empty = not deployed (503).",
    )
    api_keys: tuple[str, ...] = setting(
        (),
        help="Comma-separated API keys, each `<key>` (all scopes) or `<key>:<scope>+<scope>` (generate, "
        "jobs, admin); when any key is set, requests need `Authorization: Bearer <key>` (or the bare "
        "key) with the route's scope.",
    )
    api_keys_file: str = setting(
        "",
        help="File of API keys, one entry per line as in api_keys (`#` comments): a mounted Secret, kept "
        "out of the environment and `ps`.",
    )
    allow_open: bool = setting(
        False,
        help="Allow listening on a non-loopback address without API keys (refused at start-up otherwise).",
    )
    max_body_bytes: int = setting(16 * 1024 * 1024, help="Largest accepted request body (413 above).")
    request_timeout_s: float = setting(600.0, help="Deadline of one generation call to textgen.")
    health_interval_s: float = setting(1.0, help="Seconds between gRPC health checks of each replica.")
    ready_timeout_s: float = setting(30.0, help="Deadline of the 1-token generation behind GET /ready.")
    threads: int = setting(
        64,
        help="Threads of the one gateway process: requests, SSE streams and WebSockets served at once (see "
        "README: one process, many threads).",
    )
    max_connections: int = setting(
        1000,
        help="Open client connections (kept-alive and waiting ones included); more wait in the listen "
        "backlog.",
    )
    max_watchers: int = setting(
        0,
        help="Job event streams (`/v1/jobs/.../events`) open at once; one more gets 429, so other requests "
        "always find a thread. 0 = half of threads; else below threads.",
    )
    keepalive_s: float = setting(5.0, help="How long an idle kept-alive connection stays open.")
    read_timeout_s: float = setting(
        30.0,
        help="Longest wait for each read of a request head or body and each write of a response; a slower "
        "client is dropped (WebSockets exempt once upgraded).",
    )
    graceful_timeout_s: float = setting(
        30.0,
        help="On SIGTERM: stop accepting, let in-flight requests and streams finish for up to this long, "
        "then exit.",
    )
    log_level: str = setting("INFO", help="Logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_json: bool = setting(False, help="Log JSON lines instead of text.")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not self.textgen_addrs:
            raise ValueError("textgen_addrs must name at least one replica")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be > 0")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        self.watchers_limit  # noqa: B018 - validates
        if self.max_connections <= self.threads:
            raise ValueError(f"max_connections ({self.max_connections}) must be > threads ({self.threads})")
        for name in ("keepalive_s", "read_timeout_s", "graceful_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        from services.gateway.auth import is_loopback

        keys = self.key_scopes  # bad entries and unreadable files stop the start
        if not keys and not is_loopback(self.host) and not self.allow_open:
            raise ValueError(
                f"refusing to serve on {self.host} without API keys: anyone who can reach it could generate "
                "and run jobs; "
                "set MEGASTACK_GATEWAY_API_KEYS_FILE (or MEGASTACK_GATEWAY_API_KEYS), or "
                "MEGASTACK_GATEWAY_ALLOW_OPEN=1 to serve open on purpose"
            )

    @property
    def watchers_limit(self) -> int:
        return watch_limit(self.max_watchers, self.threads, "threads")

    @functools.cached_property
    def key_scopes(self) -> dict[bytes, frozenset[str]]:
        """API key -> scopes (services/gateway/auth.py), parsed once: at start-up, where a bad entry stops
        it."""
        from services.gateway.auth import parse_keys

        return parse_keys(self.api_keys, self.api_keys_file or None)
