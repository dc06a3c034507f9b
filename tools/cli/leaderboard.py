"""`megastack eval leaderboard --training-job ID`: a training run's checkpoints x tasks.

The rows come from the trainer (``TrainJob.evaluations``: each checkpoint its spec's ``evaluate`` asked for,
exported by the converter and scored by the evaluator); the table shows each task's headline metric, JSON
and CSV every metric.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time

from shared.text import aligned
from tools.cli.endpoints import endpoint


def rows_of(job) -> list[dict]:
    """One dict per checkpoint: step, state, ids, the export folder, {task: {metric: value}}, error."""
    return [
        {
            "step": e.step,
            "state": e.state,
            "scores": {t.task: dict(sorted(t.metrics.items())) for t in e.scores},
            "evaluation_job_id": e.evaluation_job_id,
            "conversion_job_id": e.conversion_job_id,
            "hf_dir": e.hf_dir,
            "error": e.error,
        }
        for e in job.evaluations
    ]


def columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) of every score, in a stable order."""
    return sorted({(t, m) for r in rows for t, ms in r["scores"].items() for m in ms})


def headline(metrics) -> tuple[str, float] | None:
    """The metric a task is usually quoted by: accuracy first, then exact match, then perplexity."""
    for prefix in ("acc_norm,", "acc,", "exact_match,", "word_perplexity,", "perplexity,"):
        for k in sorted(metrics):
            if k.startswith(prefix):
                return k.split(",")[0], metrics[k]
    return next(iter(sorted(metrics.items())), None)


def table(rows: list[dict]) -> str:
    heads: dict[str, str] = {}
    for r in rows:
        for task, metrics in r["scores"].items():
            main = headline(metrics)
            if main and task not in heads:
                heads[task] = next(k for k in sorted(metrics) if k.split(",")[0] == main[0])
    tasks = sorted(heads)
    header = ["step", "state", *(f"{t} {heads[t].split(',')[0]}" for t in tasks)]
    body = []
    for r in rows:
        cells = [str(r["step"]), r["state"]]
        for t in tasks:
            v = r["scores"].get(t, {}).get(heads[t])
            cells.append("-" if v is None else f"{v:.4f}")
        body.append(cells + ([r["error"]] if r["error"] else []))
    return aligned([header, *body])


def leaderboard(a: argparse.Namespace) -> int:
    from protos.trainer.v1 import trainer_pb2 as pb
    from protos.trainer.v1 import trainer_pb2_grpc as pb_grpc
    from shared.grpc.channel import make_channel
    from tools.cli.rpc import rpc

    deadline = time.monotonic() + a.wait_s
    with make_channel(a.trainer) as ch:
        stub = pb_grpc.TrainerServiceStub(ch)
        while True:
            job = rpc(stub.GetTrainJob, pb.GetTrainJobRequest(job_id=a.training_job)).job
            if job.evaluations_final or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
    if not job.spec.HasField("evaluate"):
        print(
            f"training job {a.training_job} asks for no checkpoint evaluations (spec.evaluate)",
            file=sys.stderr,
        )
        return 1
    rows = rows_of(job)
    if a.format == "json":
        print(json.dumps({"training_job": a.training_job, "checkpoints": rows}, indent=1))
    elif a.format == "csv":
        cols = columns(rows)
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["step", "state", *(f"{t}/{m}" for t, m in cols), "evaluation_job_id", "error"])
        for r in rows:
            w.writerow(
                [
                    r["step"],
                    r["state"],
                    *(r["scores"].get(t, {}).get(m, "") for t, m in cols),
                    r["evaluation_job_id"],
                    r["error"],
                ]
            )
    else:
        print(table(rows) if rows else "no checkpoint has been saved and evaluated yet")
    return 0


def add_parser(esub: argparse._SubParsersAction) -> None:
    lb = esub.add_parser(
        "leaderboard",
        help="a training run's checkpoints x tasks, from the evaluations its spec asked for",
    )
    lb.add_argument("--training-job", required=True, metavar="ID", help="the trainer's job id")
    lb.add_argument(
        "--trainer", default=endpoint("trainer"), help="trainer service address (default %(default)s)"
    )
    lb.add_argument("--format", choices=("table", "json", "csv"), default="table")
    lb.add_argument(
        "--wait-s",
        type=float,
        default=0.0,
        help="wait up to this long for the job to end and every checkpoint's evaluation to finish",
    )
    lb.set_defaults(func=leaderboard)
