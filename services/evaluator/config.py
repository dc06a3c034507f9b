"""evaluator settings (environment variables MEGASTACK_EVALUATOR_*)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import JobServiceConfig, setting
from shared.paths import RUN_DIR


@dataclass(frozen=True, kw_only=True)
class EvaluatorConfig(JobServiceConfig):
    port: int = setting(50054, help="gRPC port; 0 picks a free port.")
    metrics_port: int = setting(9404, help="Prometheus /metrics port; 0 picks a free port.")
    jobs_dir: Path = setting(
        RUN_DIR / "evaluator", help="Evaluation records, lm-eval results and logs (survive restarts)."
    )
    max_concurrent: int = setting(1, help="Evaluations running at once (each is its own process).")
    request_cache: bool = setting(
        True,
        help="Keep every answer textgen gives (scores, generations) in jobs_dir/request-cache.sqlite, keyed "
        "by the served checkpoint's and tokenizer's fingerprints, the engine's numeric mode and the request: "
        "a re-run sends nothing already answered, a killed run resumes with what is missing.",
    )
    include_paths: tuple[str, ...] = setting(
        (), help="Extra folders of lm-eval task YAMLs available to every run."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
