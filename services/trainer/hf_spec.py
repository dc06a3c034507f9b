"""Submit-time checks of an ``hf-deepspeed`` spec: every refusal a 400 naming the spec's field.

Checked here rather than on the cluster: the parallel layout (ZeRO is data parallel only), the ZeRO
stage and offload options against the device, precision against the device, the HF model folder (a
family megastack reads, its tokenizer), every record of the data files (its style's keys, without
tokenizing), the number of steps ``training.epochs`` gives, and the save and export folders.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.errors import InvalidArgument


def _bad(message: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, field=field)


def _check_records(files, field: str, enc) -> int:
    from llm.sft_records import InputError, read_records

    n = 0
    for f in files:
        if not Path(f).is_file():
            raise _bad(f"{field}: {f} does not exist", field)
        try:
            records = read_records(f)
            for where, doc in records:
                enc.check(doc, where)
        except InputError as e:
            raise _bad(f"{field}: {e}", field) from None
        n += len(records)
    return n


def _refuse_megatron_fields(spec) -> None:
    for name, value in (
        ("model.init_from", spec.init_from),
        ("model.architecture", spec.architecture),
        ("data.paths", spec.data_paths),
        ("data.valid_paths", spec.valid_data_paths),
        ("data.cache_dir", spec.data_cache_dir),
        ("parallel.sequence_parallel", spec.sequence_parallel),
        ("parallel.distributed_optimizer", spec.distributed_optimizer),
        ("parallel.num_layer_list", spec.num_layer_list),
        ("checkpoint.async_save", spec.async_save),
        ("evaluate", spec.evaluate),
    ):
        if value:
            raise _bad(
                f"{name} is for the megatron-core kinds (pretrain, sft); an hf-deepspeed job does not read "
                "it"
                + (
                    " (give the HF model as model.hf_model)"
                    if name in ("model.init_from", "model.architecture")
                    else " (give instruction records as data.files)"
                    if name.startswith("data.")
                    else ""
                ),
                name,
            )
    for name, value in (
        ("parallel.tensor_parallel", spec.tp),
        ("parallel.pipeline_parallel", spec.pp),
        ("parallel.virtual_pipeline", spec.vpp),
    ):
        if value != 1:
            raise _bad(
                f"{name} must be 1 for hf-deepspeed: DeepSpeed ZeRO shards the data-parallel ranks only "
                "(use parallel.data_parallel and deepspeed.zero_stage)",
                name,
            )
    if spec.transformer_impl not in ("auto", "local"):
        raise _bad("training.transformer_impl is for the megatron-core kinds", "training.transformer_impl")


def _check_device_options(spec) -> None:
    gpu = spec.gpus_per_worker > 0
    if spec.zero_stage not in (0, 1, 2, 3):
        raise _bad(
            f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {spec.zero_stage}", "deepspeed.zero_stage"
        )
    if spec.offload_optimizer and spec.zero_stage == 0:
        raise _bad("deepspeed.offload_optimizer needs zero_stage 1, 2 or 3", "deepspeed.offload_optimizer")
    if spec.offload_param and spec.zero_stage != 3:
        raise _bad("deepspeed.offload_param needs zero_stage 3", "deepspeed.offload_param")
    for name, on in (("offload_optimizer", spec.offload_optimizer), ("offload_param", spec.offload_param)):
        if on and not gpu:
            raise _bad(
                f"deepspeed.{name} moves state from GPU memory to host memory; these ranks run on CPUs "
                "(resources.gpus_per_worker is 0), where the state is in host memory already",
                f"deepspeed.{name}",
            )
    if spec.precision == "fp16" and not gpu:
        raise _bad(
            "training.precision fp16: DeepSpeed refuses fp16 on CPU ranks; use bf16 (or fp32)",
            "training.precision",
        )
    if spec.recompute == "selective":
        raise _bad(
            "training.recompute selective is megatron-core's; an HF model checkpoints whole layers: use full "
            "(gradient checkpointing) or none",
            "training.recompute",
        )
    if spec.bucket_size < 0:
        raise _bad("deepspeed.bucket_size must be >= 0 (0 = the model's size)", "deepspeed.bucket_size")


def _check_model(spec):
    from llm.models.registry import arch_from_hf_config

    cfg = Path(spec.hf_model) / "config.json"
    if not spec.hf_model:
        raise _bad(
            "model.hf_model (the HF model folder to train) is required for hf-deepspeed", "model.hf_model"
        )
    if not cfg.is_file():
        raise _bad(f"model.hf_model {spec.hf_model} has no config.json", "model.hf_model")
    try:
        arch = arch_from_hf_config(json.loads(cfg.read_text()), str(cfg))
    except InvalidArgument as e:
        raise _bad(f"model.hf_model: {e.message}", "model.hf_model") from None
    from llm.tokenizers import FastTokenizer

    tok_dir = Path(spec.tokenizer or spec.hf_model)
    try:
        tok = FastTokenizer.from_dir(tok_dir)
    except Exception as e:  # noqa: BLE001 - a folder without a usable tokenizer, whatever the reason
        field = "model.tokenizer" if spec.tokenizer else "model.hf_model"
        raise _bad(
            f"no tokenizer in {tok_dir} ({type(e).__name__}: {e}); set model.tokenizer", field
        ) from None
    return arch, tok


def validate_hf_deepspeed(spec) -> None:  # noqa: C901 - one check per rule
    """Raise InvalidArgument (naming the field) for anything an hf-deepspeed job could not run."""
    from services.trainer.hf_data import steps_per_epoch
    from services.trainer.spec_common import check_resources, check_save_dir, job_inputs

    _refuse_megatron_fields(spec)
    for name, f in (
        ("data.seq_length", "seq_length"),
        ("training.micro_batch_size", "micro_batch_size"),
        ("parallel.data_parallel", "dp"),
        ("training.log_interval", "log_interval"),
    ):
        if getattr(spec, f) < 1:
            raise _bad(f"{name} must be >= 1, got {getattr(spec, f)}", name)
    if (spec.train_iters > 0) == (spec.epochs > 0):
        raise _bad(
            "give exactly one of training.train_iters (optimizer steps) and training.epochs (passes over "
            "data.files)",
            "training.train_iters",
        )
    if spec.train_iters < 0 or spec.epochs < 0:
        raise _bad("training.train_iters and training.epochs must be >= 0", "training.epochs")
    if spec.global_batch_size % (spec.micro_batch_size * spec.dp):
        raise _bad(
            f"training.global_batch_size {spec.global_batch_size} must be a multiple of micro_batch_size x "
            f"data_parallel = {spec.micro_batch_size} x {spec.dp} (the rest is gradient accumulation)",
            "training.global_batch_size",
        )
    _check_device_options(spec)
    from services.trainer.spec_common import DECAY_STYLES, PRECISIONS

    if spec.precision not in PRECISIONS:
        raise _bad(f"training.precision must be one of {', '.join(PRECISIONS)}", "training.precision")
    if spec.recompute not in ("none", "full"):
        raise _bad("training.recompute must be none or full", "training.recompute")
    if spec.lr_decay_style not in DECAY_STYLES:
        raise _bad(
            f"optimizer.lr_decay_style must be one of {', '.join(DECAY_STYLES)}", "optimizer.lr_decay_style"
        )
    if not spec.lr > 0:
        raise _bad("optimizer.lr must be > 0", "optimizer.lr")
    if not 0 <= spec.min_lr <= spec.lr:
        raise _bad("optimizer.min_lr must be between 0 and optimizer.lr", "optimizer.min_lr")
    check_resources(spec)
    if not spec.save_dir:
        raise _bad("checkpoint.save_dir is required", "checkpoint.save_dir")
    check_save_dir(spec)
    if spec.export_hf_dir:
        from shared.atomic import check_output_folder

        check_output_folder(
            Path(spec.export_hf_dir),
            inputs=[*job_inputs(spec), Path(spec.save_dir)],
            field="checkpoint.export_hf_dir",
        )
    arch, tok = _check_model(spec)
    if spec.seq_length > arch.max_position_embeddings:
        raise _bad(
            f"data.seq_length {spec.seq_length} exceeds the model's {arch.max_position_embeddings} positions",
            "data.seq_length",
        )
    if not spec.data_files:
        raise _bad("data.files needs at least one .json or .jsonl file of instruction records", "data.files")
    from llm.sft_records import RecordEncoder

    enc = RecordEncoder(tok)
    n = _check_records(spec.data_files, "data.files", enc)
    if spec.eval_interval and not spec.valid_data_files:
        raise _bad("training.eval_interval needs data.valid_files to evaluate on", "data.valid_files")
    n_valid = _check_records(spec.valid_data_files, "data.valid_files", enc)
    if spec.valid_data_files and n_valid < spec.micro_batch_size * spec.dp:
        raise _bad(
            f"data.valid_files hold {n_valid} records, fewer than one micro-batch per rank "
            f"({spec.micro_batch_size} x {spec.dp})",
            "data.valid_files",
        )
    spe = steps_per_epoch(n, spec.global_batch_size)
    if spe == 0:
        raise _bad(
            f"data.files hold {n} records, fewer than one global batch of {spec.global_batch_size}",
            "training.global_batch_size",
        )
    total = spec.train_iters or spec.epochs * spe
    decay = spec.lr_decay_iters or total
    if not 0 <= spec.lr_warmup_iters < decay:
        raise _bad(
            f"optimizer.lr_warmup_iters ({spec.lr_warmup_iters}) must be >= 0 and below the decay steps "
            f"({decay})",
            "optimizer.lr_warmup_iters",
        )
