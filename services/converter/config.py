"""converter settings (environment variables MEGASTACK_CONVERTER_*)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import JobServiceConfig, setting
from shared.paths import RUN_DIR


@dataclass(frozen=True, kw_only=True)
class ConverterConfig(JobServiceConfig):
    port: int = setting(50052, help="gRPC port; 0 picks a free port.")
    metrics_port: int = setting(9402, help="Prometheus /metrics port; 0 picks a free port.")
    jobs_dir: Path = setting(
        RUN_DIR / "converter", help="Where job records and logs are kept (survive restarts)."
    )
    max_concurrent: int = setting(1, help="Conversions running at once (each is its own process).")
    cancel_grace_s: float = setting(
        10.0, help="Seconds a cancelled conversion gets to clean up before SIGKILL."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
