"""trainer settings (environment variables MEGASTACK_TRAINER_*)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import JobServiceConfig, setting
from shared.paths import RUN_DIR


@dataclass(frozen=True, kw_only=True)
class TrainerConfig(JobServiceConfig):
    port: int = setting(50053, help="gRPC port; 0 picks a free port.")
    metrics_port: int = setting(9403, help="Prometheus /metrics port; 0 picks a free port.")
    ray_address: str = setting(
        "http://127.0.0.1:8265",
        help="Ray dashboard (Jobs API) address of the cluster; `make up` starts a local head there.",
    )
    jobs_dir: Path = setting(RUN_DIR / "trainer", help="Job records, specs and logs (survive restarts).")
    python: str = setting(
        "", help="Python the Ray job runs on the cluster; empty = this service's interpreter."
    )
    runtime_env_json: str = setting(
        "",
        help='Extra Ray runtime_env as JSON, e.g. {"working_dir": "...", "pip": [...]} for remote clusters.',
    )
    resource_wait_s: float = setting(
        0.0,
        help="Seconds a job waits for the Ray cluster to offer the CPUs/GPUs it asks when the "
        "cluster has fewer in all (an autoscaling cluster adds nodes); 0 = fail at once, naming the field.",
    )
    poll_interval_s: float = setting(1.0, help="Seconds between status polls of running jobs.")
    converter_addr: str = setting(
        "",
        help="converter gRPC address; exports the checkpoints a spec's `evaluate` asks for (empty: "
        "such specs are refused, naming the field). `make up` sets it.",
    )
    evaluator_addr: str = setting(
        "",
        help="evaluator gRPC address; scores the exported checkpoints a spec's `evaluate` asks for "
        "(empty: such specs are refused). `make up` sets it.",
    )
    ray_poll_interval_s: float = setting(
        5.0,
        help="While a job's status file shows fresh steps, seconds between asking Ray "
        "for its state (each ask costs the head's dashboard and GCS some CPU).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resource_wait_s < 0:
            raise ValueError("resource_wait_s must be >= 0")
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")
        if self.ray_poll_interval_s < 0:
            raise ValueError("ray_poll_interval_s must be >= 0")
        if self.runtime_env_json:
            import json

            try:
                if not isinstance(json.loads(self.runtime_env_json), dict):
                    raise ValueError
            except ValueError:
                raise ValueError("runtime_env_json must be a JSON object") from None
