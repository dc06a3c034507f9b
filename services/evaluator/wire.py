"""protobuf <-> evaluator types."""

from __future__ import annotations

from typing import Any

from protos.evaluator.v1 import evaluator_pb2 as pb
from services.evaluator.harness import EvalSpec
from shared.jobs import JobRecord
from shared.jobs_wire import spec_doc, spec_message, status_pb


def spec_from_pb(s: pb.EvaluationSpec) -> EvalSpec:
    """The message as the domain spec (zero values take the defaults)."""
    return EvalSpec(
        tasks=tuple(s.tasks),
        textgen_address=s.textgen_address,
        hf_checkpoint=s.hf_checkpoint,
        completions_url=s.completions_url,
        num_fewshot=s.num_fewshot,
        limit=s.limit,
        batch_size=s.batch_size or 16,
        seed=s.seed or 1234,
        include_paths=tuple(s.include_paths),
        name=s.name,
        apply_chat_template=s.apply_chat_template,
        system_instruction=s.system_instruction,
        fewshot_as_multiturn=s.fewshot_as_multiturn,
    )


def spec_to_pb(s: EvalSpec) -> pb.EvaluationSpec:
    """The domain spec as the message (spec_from_pb of it gives ``s`` back)."""
    out = pb.EvaluationSpec(
        tasks=s.tasks,
        num_fewshot=s.num_fewshot,
        limit=s.limit,
        batch_size=s.batch_size,
        seed=s.seed,
        include_paths=s.include_paths,
        name=s.name,
        apply_chat_template=s.apply_chat_template,
        system_instruction=s.system_instruction,
        fewshot_as_multiturn=s.fewshot_as_multiturn,
    )
    if s.textgen_address:
        out.textgen_address = s.textgen_address
    elif s.hf_checkpoint:
        out.hf_checkpoint = s.hf_checkpoint
    elif s.completions_url:
        out.completions_url = s.completions_url
    return out


def spec_record(spec: EvalSpec) -> dict[str, Any]:
    """What a job record (and the worker's spec.json) keeps: the message's JSON mapping."""
    return spec_doc(spec_to_pb(spec))


def spec_from_record(doc: dict[str, Any]) -> EvalSpec:
    """The domain spec of a job record."""
    return spec_from_pb(spec_message(doc, pb.EvaluationSpec))


def evaluation_pb(rec: JobRecord) -> pb.Evaluation:
    """A job record as the Evaluation message."""
    r = rec.result or {}
    result = pb.EvaluationResult(
        tasks=[
            pb.TaskScores(task=t["task"], metrics=t["metrics"], num_samples=t["num_samples"])
            for t in r.get("tasks", [])
        ],
        results_path=r.get("results_path", ""),
        summary=r.get("summary", ""),
        num_requests=r.get("num_requests", 0),
        seconds=r.get("seconds", 0.0),
        determinism=r.get("determinism", -1.0),
        requests_sent=r.get("requests_sent", r.get("num_requests", 0)),
        cache_hits=r.get("cache_hits", 0),
    )
    return pb.Evaluation(status=status_pb(rec), spec=spec_message(rec.spec, pb.EvaluationSpec), result=result)
