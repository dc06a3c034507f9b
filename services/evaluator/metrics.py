"""Prometheus metrics of the evaluator (prefix megastack_evaluator_)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RUNS = Counter("megastack_evaluator_runs_total", "Evaluations finished, by final state.", ["state"])
DURATION = Histogram(
    "megastack_evaluator_run_duration_seconds",
    "Evaluation time.",
    buckets=(5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
REQUESTS = Counter("megastack_evaluator_requests_total", "LM requests answered in finished evaluations.")
SCORE = Gauge("megastack_evaluator_score", "Last score per task and metric.", ["task", "metric"])
for s in ("succeeded", "failed", "cancelled"):
    RUNS.labels(s)
