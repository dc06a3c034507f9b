"""Prometheus metrics of the trainer launcher (prefix megastack_trainer_)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SUBMITTED = Counter("megastack_trainer_job_submit_total", "Training jobs submitted to Ray.")
FINISHED = Counter("megastack_trainer_jobs_finished_total", "Training jobs that reached a final state, by state.", ["state"])
ACTIVE = Gauge("megastack_trainer_jobs_active", "Training jobs pending or running.")
RESTARTS = Counter("megastack_trainer_job_restarts_total", "Automatic restarts (attempts after the first) from the last checkpoint, "
                   "by why the attempt before ended (hang: a rank silent for resources.hang_timeout_s; rank_failed).", ["reason"])
for r in ("hang", "rank_failed"):
    RESTARTS.labels(r)
STEP_TIME = Gauge("megastack_trainer_last_step_time_seconds", "Step time last reported by a running job.")
TOKENS = Gauge("megastack_trainer_last_tokens_per_second", "Throughput last reported by a running job.")
LOSS = Gauge("megastack_trainer_last_loss", "Training loss last reported by a running job.")
for s in ("succeeded", "failed", "cancelled"):
    FINISHED.labels(s)
