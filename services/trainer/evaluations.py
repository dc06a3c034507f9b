"""Checkpoint evaluations of a training job (``spec.evaluate``), without a manual step.

Each chosen checkpoint of the run (every ``every_n_saves``-th save, by step, and the final one) goes
through two other services over gRPC: the converter exports ``iter_XXXXXXX`` to HF under
``<save_dir>/hf-evaluations/iter_XXXXXXX``, then the evaluator scores the export with lm-eval. A row per
checkpoint lives in the job record's ``result["evaluations"]`` and moves
exporting -> evaluating -> succeeded | failed; ``TrainJob.evaluations`` carries the rows and
``megastack eval leaderboard`` prints them.

While an export runs, a hold file (``jobfiles.HOLD_PREFIX``) keeps the job's checkpoint rotation
(``keep_last``) from deleting the iteration being read. Both submits carry request ids derived from the job
and the step, so a trainer restarted between a submit and its record update finds the same conversion and
evaluation again instead of starting twins. One thread follows every job that asks for evaluations, while it
trains and after it ends, until each chosen checkpoint's row is final.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import grpc

from protos.common.v1 import common_pb2
from protos.converter.v1 import converter_pb2 as cpb
from protos.converter.v1 import converter_pb2_grpc as cpb_grpc
from protos.evaluator.v1 import evaluator_pb2 as epb
from protos.evaluator.v1 import evaluator_pb2_grpc as epb_grpc
from services.trainer.jobfiles import EVAL_EXPORT_DIR, hold_file, iter_name
from services.trainer.spec import TrainSpec
from services.trainer.wire import spec_from_record
from shared.errors import FailedPrecondition
from shared.grpc.channel import make_channel
from shared.jobs import JobRecord, JobStore

logger = logging.getLogger(__name__)
EXPORTING, EVALUATING, SUCCEEDED, FAILED = "exporting", "evaluating", "succeeded", "failed"
FINAL = (SUCCEEDED, FAILED)
ENDED = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
RPC_TIMEOUT_S = 30.0


def chosen(spec: TrainSpec, step: int) -> bool:
    """Whether the checkpoint of ``step`` is one ``spec.evaluate`` asks for: every N-th save (saves fall on
    multiples of ``save_interval``) and the final step."""
    assert spec.evaluate is not None
    every = spec.save_interval * spec.evaluate.every_n_saves
    return step == spec.train_iters or (every > 0 and step % every == 0)


def saved_steps(save_dir: Path, since_unix_s: float) -> list[int]:
    """Steps of the complete checkpoints in ``save_dir`` written since ``since_unix_s`` (a checkpoint folder
    appears in one rename, so every ``iter_*`` folder is complete; older ones belong to earlier jobs)."""
    out = []
    for p in Path(save_dir).glob("iter_*"):
        try:
            if p.name[5:].isdigit() and p.is_dir() and p.stat().st_mtime >= since_unix_s - 1:
                out.append(int(p.name[5:]))
        except OSError:  # rotated away while we looked
            continue
    return sorted(out)


def _rpc_error(e: grpc.RpcError) -> str:
    return f"{e.code().name}: {e.details()}" if hasattr(e, "code") else str(e)


class CheckpointEvaluations:
    """Follows the checkpoint evaluations of every job whose spec asks for them."""

    def __init__(
        self, store: JobStore, *, converter_addr: str, evaluator_addr: str, poll_interval_s: float = 1.0
    ) -> None:
        self.store = store
        self.converter_addr, self.evaluator_addr = converter_addr, evaluator_addr
        self.poll_interval_s = poll_interval_s
        self._converter = self._evaluator = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trainer-evaluations", daemon=True)

    @property
    def configured(self) -> bool:
        return bool(self.converter_addr and self.evaluator_addr)

    def check(self, spec: TrainSpec) -> None:
        """At submit: a spec asking for evaluations needs both services configured."""
        if spec.evaluate is not None and not self.configured:
            raise FailedPrecondition(
                "evaluate needs the converter and evaluator services: this trainer has no "
                "MEGASTACK_TRAINER_CONVERTER_ADDR / MEGASTACK_TRAINER_EVALUATOR_ADDR",
                field="evaluate",
            )

    def start(self) -> None:
        if self.configured:
            self._converter = cpb_grpc.ConverterServiceStub(make_channel(self.converter_addr))
            self._evaluator = epb_grpc.EvaluatorServiceStub(make_channel(self.evaluator_addr))
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            for rec in self.store.list():
                if rec.spec.get("evaluate") and not (rec.result or {}).get("evaluations_final"):
                    try:
                        self.advance(rec)
                    except Exception:  # noqa: BLE001 - keep following the others
                        logger.warning("cannot follow the evaluations of %s", rec.job_id, exc_info=True)

    # -- one job -----------------------------------------------------------------------------------
    def advance(self, rec: JobRecord) -> None:
        """Start what newly saved checkpoints need, move every open row one step, record the rows."""
        spec = spec_from_record(rec.spec)
        rows = {r["step"]: dict(r) for r in (rec.result or {}).get("evaluations", [])}
        before = {s: dict(r) for s, r in rows.items()}
        for step in saved_steps(Path(spec.save_dir), rec.created_unix_s):
            if step not in rows and chosen(spec, step):
                row = self._export(rec, spec, step)
                if row is not None:
                    rows[step] = row
        for row in rows.values():
            if row["state"] == EXPORTING:
                self._after_export(rec, spec, row)
            elif row["state"] == EVALUATING:
                self._after_evaluation(row)
        final = rec.terminal and all(r["state"] in FINAL for r in rows.values())
        if rows != before or final:
            result = {**(rec.result or {}), "evaluations": [rows[s] for s in sorted(rows)]}
            if final:
                result["evaluations_final"] = True
            self.store.update(rec.job_id, result=result)

    def _export(self, rec: JobRecord, spec: TrainSpec, step: int) -> dict[str, Any] | None:
        save = Path(spec.save_dir)
        hold = hold_file(save, step)
        hold.touch()
        hf_dir = save / EVAL_EXPORT_DIR / iter_name(step)
        row: dict[str, Any] = {"step": step, "state": EXPORTING, "hf_dir": str(hf_dir)}
        if not (save / iter_name(step)).is_dir():
            hold.unlink(missing_ok=True)
            return {
                **row,
                "state": FAILED,
                "error": f"checkpoint {iter_name(step)} was rotated out before it could be exported "
                "(save less often or keep more checkpoints)",
            }
        req = cpb.SubmitConversionRequest(
            spec=cpb.ConversionSpec(
                load_dir=str(save),
                load_iteration=step,
                save_dir=str(hf_dir),
                target_format=common_pb2.CHECKPOINT_FORMAT_HF,
            ),
            request_id=f"{rec.job_id}-export-{step}",
            labels={"training_job": rec.job_id, "step": str(step)},
        )
        try:
            row["conversion_job_id"] = self._converter.SubmitConversion(req, timeout=RPC_TIMEOUT_S).job_id
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:  # the converter is down: try again on the next poll
                hold.unlink(missing_ok=True)
                logger.warning("converter unavailable; exporting step %d of %s later", step, rec.job_id)
                return None
            hold.unlink(missing_ok=True)
            return {**row, "state": FAILED, "error": f"export refused: {_rpc_error(e)}"}
        logger.info("%s: exporting step %d (%s)", rec.job_id, step, row["conversion_job_id"])
        return row

    def _after_export(self, rec: JobRecord, spec: TrainSpec, row: dict[str, Any]) -> None:
        try:
            conv = self._converter.GetConversion(
                cpb.GetConversionRequest(job_id=row["conversion_job_id"]), timeout=RPC_TIMEOUT_S
            ).conversion
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                return
            hold_file(spec.save_dir, row["step"]).unlink(missing_ok=True)
            row.update(state=FAILED, error=f"export lost: {_rpc_error(e)}")
            return
        if conv.status.state not in ENDED:
            return
        hold_file(spec.save_dir, row["step"]).unlink(missing_ok=True)
        if conv.status.state != common_pb2.JOB_STATE_SUCCEEDED:
            row.update(state=FAILED, error=f"export failed: {conv.status.error}")
            return
        e = spec.evaluate
        assert e is not None
        req = epb.SubmitEvaluationRequest(
            spec=epb.EvaluationSpec(
                hf_checkpoint=row["hf_dir"],
                tasks=e.tasks,
                limit=e.limit,
                num_fewshot=e.num_fewshot,
                batch_size=e.batch_size,
                seed=spec.seed,
                name=f"{spec.name} step {row['step']}",
            ),
            request_id=f"{rec.job_id}-eval-{row['step']}",
            labels={"training_job": rec.job_id, "step": str(row["step"])},
        )
        try:
            row["evaluation_job_id"] = self._evaluator.SubmitEvaluation(req, timeout=120).job_id
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                return  # the export is done; the evaluation is asked again on the next poll
            row.update(state=FAILED, error=f"evaluation refused: {_rpc_error(err)}")
            return
        row["state"] = EVALUATING
        logger.info("%s: evaluating step %d (%s)", rec.job_id, row["step"], row["evaluation_job_id"])

    def _after_evaluation(self, row: dict[str, Any]) -> None:
        try:
            ev = self._evaluator.GetEvaluation(
                epb.GetEvaluationRequest(job_id=row["evaluation_job_id"]), timeout=RPC_TIMEOUT_S
            ).evaluation
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                row.update(state=FAILED, error=f"evaluation lost: {_rpc_error(e)}")
            return
        if ev.status.state not in ENDED:
            return
        if ev.status.state != common_pb2.JOB_STATE_SUCCEEDED:
            row.update(state=FAILED, error=f"evaluation failed: {ev.status.error}")
            return
        row["state"] = SUCCEEDED
        row["scores"] = [
            {"task": t.task, "metrics": dict(t.metrics), "num_samples": t.num_samples}
            for t in ev.result.tasks
        ]
