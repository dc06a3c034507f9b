"""A training job on a fresh local Ray head, submitted and followed as the trainer service does: what the
training benchmarks (train.py, train_deepspeed.py) time against torchrun."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def local_ray_head(work: Path) -> Iterator[str]:
    """A Ray head on free ports (2 CPUs, token auth as `make up` starts it); yields its dashboard address."""
    from tools.stack import Stack, ray_auth_env, ray_head

    head = ray_head(work, free_ports=True, num_cpus=2)
    stack = Stack(work, [head])
    stack.start_one(head, dict(os.environ))
    # the head runs with token auth: this process's job client must send the token
    os.environ.update(ray_auth_env(work))
    try:
        stack.wait_healthy(head, 120)
        yield head.endpoints["dashboard"]
    finally:
        stack.stop_one(head)


def run_job(s, work: Path, address: str) -> float:
    """Submit ``s`` through the trainer's Ray launcher and follow it to the end; seconds from submission.
    RuntimeError with the job's error when it does not succeed."""
    from services.trainer.api import RayLauncher, spec_record
    from shared.jobs import JobStore

    store = JobStore(work / f"jobs-{Path(s.save_dir).name}", "train")
    launcher = RayLauncher(store, ray_address=address)
    rec, _ = store.create(spec_record(s))
    t0 = time.perf_counter()
    launcher.submit(rec, s)
    while not store.get(rec.job_id).terminal:  # followed as the trainer service follows it
        launcher.poll(rec.job_id)
        time.sleep(launcher.poll_interval_s)
    took = time.perf_counter() - t0
    if store.get(rec.job_id).state != "succeeded":
        raise RuntimeError(store.get(rec.job_id).error)
    return took
