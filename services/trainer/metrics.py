"""Prometheus metrics of the trainer launcher (prefix megastack_trainer_)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SUBMITTED = Counter("megastack_trainer_job_submit_total", "Training jobs submitted to Ray.")
FINISHED = Counter(
    "megastack_trainer_jobs_finished_total", "Training jobs that reached a final state, by state.", ["state"]
)
ACTIVE = Gauge("megastack_trainer_jobs_active", "Training jobs pending or running.")
RESTARTS = Counter(
    "megastack_trainer_job_restarts_total",
    "Automatic restarts (attempts after the first) from the last checkpoint, "
    "by why the attempt before ended (hang: a rank silent for resources.hang_timeout_s; rank_failed).",
    ["reason"],
)
for r in ("hang", "rank_failed"):
    RESTARTS.labels(r)
STEP_TIME = Gauge("megastack_trainer_last_step_time_seconds", "Step time last reported by a running job.")
TOKENS = Gauge("megastack_trainer_last_tokens_per_second", "Throughput last reported by a running job.")
LOSS = Gauge("megastack_trainer_last_loss", "Training loss last reported by a running job.")
for s in ("succeeded", "failed", "cancelled"):
    FINISHED.labels(s)

# Per job, from the job's status file, while it runs (removed when it ends: TensorBoard and metrics.jsonl in
# the save_dir keep the whole curve). Labels: job_id (the megastack job id) and name (the spec's name).
JOB_LABELS = ["job_id", "name"]
JOB_GAUGES = {
    "step": Gauge("megastack_trainer_job_step", "Last step the job reported.", JOB_LABELS),
    "step_time_s": Gauge(
        "megastack_trainer_job_step_time_seconds", "Wall time of the job's last step.", JOB_LABELS
    ),
    "tokens_per_s": Gauge(
        "megastack_trainer_job_tokens_per_second",
        "Tokens trained per second (global batch x seq_length / step time).",
        JOB_LABELS,
    ),
    "tflops": Gauge(
        "megastack_trainer_job_model_tflops",
        "Model TFLOP/s of the whole job (6N + attention per token).",
        JOB_LABELS,
    ),
    "mfu": Gauge(
        "megastack_trainer_job_mfu",
        "Model FLOPs utilisation: model TFLOP/s over the job's peak "
        "(resources.peak_tflops_per_worker x ranks, else the GEMM peak each rank measured).",
        JOB_LABELS,
    ),
    "loss": Gauge("megastack_trainer_job_loss", "Training loss of the job's last step.", JOB_LABELS),
    "grad_norm": Gauge(
        "megastack_trainer_job_grad_norm", "Gradient norm of the job's last step.", JOB_LABELS
    ),
    "lr": Gauge("megastack_trainer_job_learning_rate", "Learning rate of the job's last step.", JOB_LABELS),
    "loss_scale": Gauge(
        "megastack_trainer_job_loss_scale", "fp16 loss scale (1 in fp32 and bf16).", JOB_LABELS
    ),
    "valid_loss": Gauge(
        "megastack_trainer_job_validation_loss", "Validation loss of the job's last evaluation.", JOB_LABELS
    ),
}
RANK_STEP_TIME = Gauge(
    "megastack_trainer_job_rank_step_time_seconds",
    "Each rank's wall time of the last logged step (a straggler shows as the slow rank).",
    [*JOB_LABELS, "rank"],
)


def set_job(job_id: str, name: str, status: dict) -> None:
    """The job's gauges from its status file (``megastack-status.json``)."""
    for key, gauge in JOB_GAUGES.items():
        if isinstance(status.get(key), (int, float)):
            gauge.labels(job_id, name).set(float(status[key]))
    for rank, seconds in enumerate(status.get("rank_step_time_s") or ()):
        RANK_STEP_TIME.labels(job_id, name, str(rank)).set(float(seconds))
        _ranks[job_id] = max(_ranks.get(job_id, 0), rank + 1)


_ranks: dict[str, int] = {}  # job id -> ranks with a series


def drop_job(job_id: str, name: str) -> None:
    """Remove a finished job's series."""
    for gauge in JOB_GAUGES.values():
        try:
            gauge.remove(job_id, name)
        except KeyError:
            pass
    for rank in range(_ranks.pop(job_id, 0)):
        try:
            RANK_STEP_TIME.remove(job_id, name, str(rank))
        except KeyError:
            pass
