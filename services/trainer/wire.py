"""protobuf <-> trainer types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protos.trainer.v1 import trainer_pb2 as pb
from services.trainer.spec import CheckpointEval, TrainSpec, absolutize
from shared.errors import InvalidArgument
from shared.jobs import JobRecord
from shared.jobs_wire import spec_doc, spec_message, status_pb

KINDS = {
    pb.TRAIN_JOB_KIND_PRETRAIN: "pretrain",
    pb.TRAIN_JOB_KIND_SFT: "sft",
    pb.TRAIN_JOB_KIND_HF_DEEPSPEED: "hf-deepspeed",
}
KINDS_PB = {v: k for k, v in KINDS.items()}


def _or(value, default):
    return value if value else default


def spec_from_pb(s: pb.TrainJobSpec) -> TrainSpec:
    d, p, o, t, c, r = s.data, s.parallel, s.optimizer, s.training, s.checkpoint, s.resources
    tp, pp = _or(p.tensor_parallel, 1), _or(p.pipeline_parallel, 1)
    dp = _or(p.data_parallel, 1)
    mbs = _or(t.micro_batch_size, 1)
    return TrainSpec(
        name=s.name or "train",
        kind=KINDS.get(s.kind, "pretrain"),
        seq_length=d.seq_length,
        train_iters=t.train_iters,
        save_dir=c.save_dir,
        data_paths=tuple((x.prefix, x.weight or 1.0) for x in d.paths),
        valid_data_paths=tuple((x.prefix, x.weight or 1.0) for x in d.valid_paths),
        init_from=s.model.init_from,
        architecture=s.model.architecture,
        tokenizer=s.model.tokenizer,
        split=d.split or "98,1,1",
        data_cache_dir=d.cache_dir,
        tp=tp,
        pp=pp,
        vpp=max(1, p.virtual_pipeline),
        dp=dp,
        sequence_parallel=p.sequence_parallel,
        distributed_optimizer=p.distributed_optimizer,
        num_layer_list=tuple(p.num_layer_list),
        ep=_or(p.expert_parallel, 1),
        moe_aux_loss_coeff=t.moe_aux_loss_coeff,
        moe_grouped_gemm=t.moe_grouped_gemm,
        moe_capacity_factor=t.moe_capacity_factor,
        lr=_or(o.lr, 3e-4),
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=_or(o.adam_beta1, 0.9),
        adam_beta2=_or(o.adam_beta2, 0.95),
        adam_eps=_or(o.adam_eps, 1e-8),
        clip_grad=_or(o.clip_grad, 1.0),
        lr_warmup_iters=o.lr_warmup_iters,
        lr_decay_iters=o.lr_decay_iters,
        lr_decay_style=o.lr_decay_style or "cosine",
        micro_batch_size=mbs,
        global_batch_size=_or(t.global_batch_size, mbs * dp),
        seed=_or(t.seed, 1234),
        precision=t.precision or "fp32",
        recompute=t.recompute or "none",
        transformer_impl=t.transformer_impl or "auto",
        log_interval=_or(t.log_interval, 1),
        eval_interval=t.eval_interval,
        eval_iters=t.eval_iters,
        save_interval=c.save_interval,
        no_resume=c.no_resume,
        async_save=c.async_save,
        cpus_per_worker=_or(r.cpus_per_worker, 1.0),
        gpus_per_worker=r.gpus_per_worker,
        max_retries=r.max_retries,
        backend=r.backend,
        num_threads=r.num_threads,
        hang_timeout_s=_or(r.hang_timeout_s, 600.0),
        peak_tflops_per_worker=r.peak_tflops_per_worker,
        evaluate=_evaluate_from_pb(s.evaluate) if s.HasField("evaluate") else None,
        hf_model=s.model.hf_model,
        data_files=tuple(d.files),
        valid_data_files=tuple(d.valid_files),
        epochs=t.epochs,
        zero_stage=s.deepspeed.zero_stage,
        offload_optimizer=s.deepspeed.offload_optimizer,
        offload_param=s.deepspeed.offload_param,
        bucket_size=s.deepspeed.bucket_size,
        export_hf_dir=c.export_hf_dir,
    )


def _evaluate_from_pb(e: pb.CheckpointEvaluationSpec) -> CheckpointEval:
    return CheckpointEval(
        tasks=tuple(e.tasks),
        limit=e.limit,
        num_fewshot=e.num_fewshot,
        every_n_saves=e.every_n_saves or 1,
        batch_size=e.batch_size,
    )


def spec_to_pb(s: TrainSpec) -> pb.TrainJobSpec:
    return pb.TrainJobSpec(
        name=s.name,
        kind=KINDS_PB[s.kind],
        model=pb.ModelSpec(
            init_from=s.init_from, architecture=s.architecture, tokenizer=s.tokenizer, hf_model=s.hf_model
        ),
        data=pb.DataSpec(
            paths=[pb.DataPath(prefix=p, weight=w) for p, w in s.data_paths],
            split=s.split,
            seq_length=s.seq_length,
            cache_dir=s.data_cache_dir,
            valid_paths=[pb.DataPath(prefix=p, weight=w) for p, w in s.valid_data_paths],
            files=s.data_files,
            valid_files=s.valid_data_files,
        ),
        parallel=pb.ParallelSpec(
            tensor_parallel=s.tp,
            pipeline_parallel=s.pp,
            virtual_pipeline=s.vpp,
            data_parallel=s.dp,
            sequence_parallel=s.sequence_parallel,
            distributed_optimizer=s.distributed_optimizer,
            num_layer_list=s.num_layer_list,
            expert_parallel=s.ep,
        ),
        optimizer=pb.OptimizerSpec(
            lr=s.lr,
            min_lr=s.min_lr,
            weight_decay=s.weight_decay,
            adam_beta1=s.adam_beta1,
            adam_beta2=s.adam_beta2,
            adam_eps=s.adam_eps,
            clip_grad=s.clip_grad,
            lr_warmup_iters=s.lr_warmup_iters,
            lr_decay_iters=s.lr_decay_iters,
            lr_decay_style=s.lr_decay_style,
        ),
        training=pb.TrainingSpec(
            micro_batch_size=s.micro_batch_size,
            global_batch_size=s.global_batch_size,
            train_iters=s.train_iters,
            seed=s.seed,
            precision=s.precision,
            recompute=s.recompute,
            log_interval=s.log_interval,
            eval_interval=s.eval_interval,
            eval_iters=s.eval_iters,
            transformer_impl=s.transformer_impl,
            epochs=s.epochs,
            moe_aux_loss_coeff=s.moe_aux_loss_coeff,
            moe_grouped_gemm=s.moe_grouped_gemm,
            moe_capacity_factor=s.moe_capacity_factor,
        ),
        checkpoint=pb.CheckpointSpec(
            save_dir=s.save_dir,
            save_interval=s.save_interval,
            no_resume=s.no_resume,
            async_save=s.async_save,
            export_hf_dir=s.export_hf_dir,
        ),
        resources=pb.ResourceSpec(
            cpus_per_worker=s.cpus_per_worker,
            gpus_per_worker=s.gpus_per_worker,
            max_retries=s.max_retries,
            backend=s.backend,
            num_threads=s.num_threads,
            hang_timeout_s=s.hang_timeout_s,
            peak_tflops_per_worker=s.peak_tflops_per_worker,
        ),
        evaluate=None
        if s.evaluate is None
        else pb.CheckpointEvaluationSpec(
            tasks=s.evaluate.tasks,
            limit=s.evaluate.limit,
            num_fewshot=s.evaluate.num_fewshot,
            every_n_saves=s.evaluate.every_n_saves,
            batch_size=s.evaluate.batch_size,
        ),
        deepspeed=pb.DeepSpeedSpec(
            zero_stage=s.zero_stage,
            offload_optimizer=s.offload_optimizer,
            offload_param=s.offload_param,
            bucket_size=s.bucket_size,
        ),
    )


def spec_record(spec: TrainSpec) -> dict[str, Any]:
    """What a job record keeps: the message's JSON mapping (as the HTTP job routes take it)."""
    return spec_doc(spec_to_pb(spec))


def spec_from_record(doc: dict[str, Any]) -> TrainSpec:
    """The domain spec of a job record."""
    return spec_from_pb(spec_message(doc, pb.TrainJobSpec))


def job_pb(rec: JobRecord) -> pb.TrainJob:
    """A job record as the TrainJob message."""
    m = rec.extra.get("metrics") or {}
    return pb.TrainJob(
        status=status_pb(rec),
        spec=spec_message(rec.spec, pb.TrainJobSpec),
        metrics=pb.TrainMetrics(
            step=int(m.get("step", 0)),
            loss=m.get("loss", 0.0),
            lr=m.get("lr", 0.0),
            grad_norm=m.get("grad_norm", 0.0),
            tokens_per_s=m.get("tokens_per_s", 0.0),
            tflops=m.get("tflops", 0.0),
            step_time_s=m.get("step_time_s", 0.0),
            last_checkpoint_step=int(m.get("last_checkpoint_step", 0)),
            mfu=m.get("mfu", 0.0),
            loss_scale=m.get("loss_scale", 0.0),
            rank_step_time_s=m.get("rank_step_time_s", []),
        ),
        ray_submission_id=rec.extra.get("submission_id", ""),
        ray_address=rec.extra.get("ray_address", ""),
        evaluations=[evaluation_pb(e) for e in (rec.result or {}).get("evaluations", [])],
        # services.trainer.evaluations marks it; a job that asks for none is final when it ends
        evaluations_final=bool((rec.result or {}).get("evaluations_final"))
        or (rec.terminal and not rec.spec.get("evaluate")),
    )


def evaluation_pb(e: dict[str, Any]) -> pb.CheckpointEvaluation:
    """One row of a job's checkpoint evaluations (services.trainer.evaluations keeps them in the record's
    result)."""
    from protos.evaluator.v1 import evaluator_pb2 as epb

    return pb.CheckpointEvaluation(
        step=e["step"],
        state=e["state"],
        hf_dir=e.get("hf_dir", ""),
        conversion_job_id=e.get("conversion_job_id", ""),
        evaluation_job_id=e.get("evaluation_job_id", ""),
        scores=[epb.TaskScores(**t) for t in e.get("scores", [])],
        error=e.get("error", ""),
    )


# -- YAML / dict form (mirrors the proto) ------------------------------------------------------------


def spec_from_dict(doc: dict[str, Any]) -> TrainSpec:
    """A YAML document -> TrainSpec, through the proto so unknown keys are refused by name."""
    from google.protobuf import json_format

    doc = dict(doc)
    if isinstance(doc.get("kind"), str) and not doc["kind"].startswith("TRAIN_JOB_KIND_"):
        doc["kind"] = "TRAIN_JOB_KIND_" + doc["kind"].upper().replace("-", "_")
    msg = pb.TrainJobSpec()
    try:
        json_format.ParseDict(doc, msg)
    except json_format.ParseError as e:
        raise InvalidArgument(f"spec: {e}", field="spec") from None
    return spec_from_pb(msg)


def load_yaml(path: Path) -> TrainSpec:
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"spec file {path} does not exist", field="spec") from None
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{path}: not valid YAML ({e})", field="spec") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{path}: a spec must be a mapping of sections", field="spec")
    return absolutize(spec_from_dict(doc))
