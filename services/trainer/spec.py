"""TrainJobSpec: a training run as typed data, validated before anything is submitted.

The YAML form mirrors the proto (``protos/trainer/v1/trainer.proto``): sections ``model``, ``data``,
``parallel``, ``optimizer``, ``training``, ``checkpoint``, ``resources``. Unknown keys are refused
(``protobuf.json_format``), zero values take the defaults below, and :func:`validate` checks what
Megatron would only find out on the cluster: the parallel layout against heads and layers, batch
sizes against the data-parallel size, data paths, and the init checkpoint's vocabulary padding.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from llm.mcore import TRANSFORMER_IMPLS as IMPLS
from services.trainer.spec_common import (  # noqa: F401 - the spec's names, imported from here by callers
    DECAY_STYLES,
    HF_DEEPSPEED,
    KINDS,
    PRECISIONS,
    RECOMPUTE,
    _prefixes,
    check_resources,
    check_save_dir,
    dataset_prefixes,
    job_inputs,
    trainer_owned,
)
from shared.errors import InvalidArgument

# llm.checkpoints.layout speaks the converter's field names; a training spec has its own
LAYOUT_FIELDS = {
    "num_layer_list": "parallel.num_layer_list",
    "target_pipeline_parallel_size": "parallel.pipeline_parallel",
    "num_layers_per_virtual_pipeline_stage": "parallel.virtual_pipeline",
}


@dataclass(frozen=True)
class CheckpointEval:
    """Which saved checkpoints the trainer service exports and has the evaluator score, and how."""

    tasks: tuple[str, ...]
    limit: int = 0  # documents per task; 0 = all
    num_fewshot: int = 0
    every_n_saves: int = 1  # the final checkpoint always
    batch_size: int = 0  # 0 = the evaluator's default


@dataclass(frozen=True)
class TrainSpec:
    name: str
    kind: str  # pretrain | sft | hf-deepspeed
    seq_length: int
    train_iters: int
    save_dir: str
    data_paths: tuple[tuple[str, float], ...]  # (prefix, weight)
    valid_data_paths: tuple[
        tuple[str, float], ...
    ] = ()  # SFT: validation sets; empty = held out of data_paths by split
    init_from: str = ""  # mcore torch_dist checkpoint (converter output)
    architecture: str = ""  # HF config folder / config.json when training from scratch
    tokenizer: str = ""
    split: str = "98,1,1"
    data_cache_dir: str = ""
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # model chunks per pipeline stage
    dp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    num_layer_list: tuple[int, ...] = ()
    ep: int = 1  # MoE: experts split over this many of the data-parallel ranks
    moe_aux_loss_coeff: float = 0.0
    moe_grouped_gemm: bool = False
    moe_capacity_factor: float = 0.0  # 0 = dropless
    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int = 0  # 0 = train_iters
    lr_decay_style: str = "cosine"
    micro_batch_size: int = 1
    global_batch_size: int = 0  # 0 = micro_batch_size * dp
    seed: int = 1234
    precision: str = "fp32"
    recompute: str = "none"
    transformer_impl: str = "auto"  # auto | local | transformer_engine (llm.mcore.model.resolve_impl)
    log_interval: int = 1
    eval_interval: int = 0
    eval_iters: int = 0
    save_interval: int = 0  # 0 = only at the end
    no_resume: bool = False
    keep_last: int = 2
    async_save: bool = False  # checkpoints written in the background (checkpointing.Saver)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_retries: int = 0
    backend: str = ""  # "" = nccl with GPUs, else gloo
    num_threads: int = 0  # 0 = cpus_per_worker
    hang_timeout_s: float = 600.0  # no heartbeat from a rank this long: the attempt is restarted
    peak_tflops_per_worker: float = 0.0  # one rank's peak for MFU; 0 = each rank measures its device at start
    evaluate: CheckpointEval | None = None  # score saved checkpoints (services/trainer/evaluations.py)
    # hf-deepspeed (services/trainer/hf_deepspeed.py): an HF model, instruction records, DeepSpeed ZeRO
    hf_model: str = ""
    data_files: tuple[str, ...] = ()
    valid_data_files: tuple[str, ...] = ()
    epochs: int = 0  # passes over data_files; 0 = train_iters steps
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    bucket_size: int = 0  # 0 = the model's parameter count
    export_hf_dir: str = ""  # the trained model as HF safetensors at the end
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        d = json.loads(text)
        d["data_paths"] = tuple(tuple(x) for x in d["data_paths"])
        d["valid_data_paths"] = tuple(tuple(x) for x in d.get("valid_data_paths", ()))
        d["num_layer_list"] = tuple(d["num_layer_list"])
        for name in ("data_files", "valid_data_files"):
            d[name] = tuple(d.get(name, ()))
        if d.get("evaluate"):
            d["evaluate"] = CheckpointEval(**{**d["evaluate"], "tasks": tuple(d["evaluate"]["tasks"])})
        return cls(**d)


NEAT_PACK_TE = (
    "neat-packed SFT data (several samples per row, kept apart) trains on megatron-core's local layer spec: "
    "set training.transformer_impl to auto or local (Transformer Engine's packed-sequence path is not wired "
    "yet)"
)


def _bad(message: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, field=field)


def resolve_arch(spec: TrainSpec):
    """(ArchConfig, padded vocab of the init checkpoint or None, tokenizer folder) for the spec."""
    from llm.checkpoints import open_checkpoint
    from llm.models.registry import arch_from_hf_config

    if spec.init_from:
        path = Path(spec.init_from)
        if not path.exists():
            raise _bad(f"model.init_from {path} does not exist", "model.init_from")
        reader = open_checkpoint(path)
        if reader.format != "mcore":
            raise _bad(
                f"model.init_from must be a torch_dist (mcore) checkpoint; {path} is {reader.format} "
                "(convert it with `megastack convert --target-format mcore`)",
                "model.init_from",
            )
        tok = Path(spec.tokenizer) if spec.tokenizer else reader.tokenizer_dir()
        return reader.arch, reader.meta.get("padded_vocab_size"), tok
    if not spec.architecture:
        raise _bad(
            "give model.init_from (a checkpoint) or model.architecture (an HF config) to train from scratch",
            "model",
        )
    cfg_path = Path(spec.architecture)
    cfg_file = cfg_path / "config.json" if cfg_path.is_dir() else cfg_path
    if not cfg_file.is_file():
        raise _bad(f"model.architecture {cfg_path} has no config.json", "model.architecture")
    tok = Path(spec.tokenizer) if spec.tokenizer else (cfg_path if cfg_path.is_dir() else None)
    return arch_from_hf_config(json.loads(cfg_file.read_text()), str(cfg_file)), None, tok


def check_roots(spec: TrainSpec) -> None:
    """Every path of a submitted job under the data roots (shared/roots.py), each refusal naming its field."""
    from shared.roots import under_roots

    for value, name in (
        (spec.init_from, "model.init_from"),
        (spec.architecture, "model.architecture"),
        (spec.tokenizer, "model.tokenizer"),
        (spec.save_dir, "checkpoint.save_dir"),
        (spec.data_cache_dir, "data.cache_dir"),
        (spec.hf_model, "model.hf_model"),
        (spec.export_hf_dir, "checkpoint.export_hf_dir"),
        *((p, "data.files") for p in spec.data_files),
        *((p, "data.valid_files") for p in spec.valid_data_files),
        *((p, "data.paths") for p, _ in spec.data_paths),
        *((p, "data.valid_paths") for p, _ in spec.valid_data_paths),
    ):
        if value:
            under_roots(value, name)


def _check_evaluate(e: CheckpointEval) -> None:
    if not e.tasks or any(not t.strip() for t in e.tasks):
        raise _bad(
            "evaluate.tasks must name at least one lm-eval task (and no empty names)", "evaluate.tasks"
        )
    for name in ("limit", "num_fewshot", "every_n_saves", "batch_size"):
        if getattr(e, name) < 0:
            raise _bad(f"evaluate.{name} must be >= 0, got {getattr(e, name)}", f"evaluate.{name}")


def validate(spec: TrainSpec) -> None:  # noqa: C901 - one check per rule
    if spec.kind not in KINDS:
        raise _bad(f"kind must be one of {', '.join(KINDS)}", "kind")
    if spec.kind == HF_DEEPSPEED:
        from services.trainer.hf_spec import validate_hf_deepspeed

        return validate_hf_deepspeed(spec)
    for name, value in (
        ("model.hf_model", spec.hf_model),
        ("data.files", spec.data_files),
        ("data.valid_files", spec.valid_data_files),
        ("training.epochs", spec.epochs),
        ("deepspeed", spec.zero_stage or spec.offload_optimizer or spec.offload_param or spec.bucket_size),
        ("checkpoint.export_hf_dir", spec.export_hf_dir),
    ):
        if value:
            raise _bad(f"{name} is for kind hf-deepspeed; a {spec.kind} job does not read it", name)
    for name in ("seq_length", "train_iters", "micro_batch_size", "tp", "pp", "vpp", "dp", "log_interval"):
        if getattr(spec, name) < 1:
            raise _bad(f"{name} must be >= 1, got {getattr(spec, name)}", name)
    if spec.precision not in PRECISIONS:
        raise _bad(f"training.precision must be one of {', '.join(PRECISIONS)}", "training.precision")
    if spec.recompute not in RECOMPUTE:
        raise _bad(f"training.recompute must be one of {', '.join(RECOMPUTE)}", "training.recompute")
    if spec.transformer_impl not in IMPLS:
        raise _bad(
            f"training.transformer_impl must be one of {', '.join(IMPLS)}", "training.transformer_impl"
        )
    if spec.lr_decay_style not in DECAY_STYLES:
        raise _bad(
            f"optimizer.lr_decay_style must be one of {', '.join(DECAY_STYLES)}", "optimizer.lr_decay_style"
        )
    if not spec.save_dir:
        raise _bad("checkpoint.save_dir is required", "checkpoint.save_dir")
    check_save_dir(spec)
    if spec.global_batch_size % (spec.micro_batch_size * spec.dp):
        raise _bad(
            f"training.global_batch_size {spec.global_batch_size} must be a multiple of micro_batch_size x "
            "data_parallel "
            f"= {spec.micro_batch_size} x {spec.dp}",
            "training.global_batch_size",
        )
    if spec.sequence_parallel and spec.tp < 2:
        raise _bad("parallel.sequence_parallel needs tensor_parallel >= 2", "parallel.sequence_parallel")
    if spec.vpp > 1 and spec.pp < 2:
        raise _bad("parallel.virtual_pipeline needs pipeline_parallel >= 2", "parallel.virtual_pipeline")
    if spec.vpp > 1 and spec.num_microbatches % spec.pp:
        raise _bad(
            f"an interleaved pipeline needs the {spec.num_microbatches} micro-batches per step to be a "
            "multiple of "
            f"pipeline_parallel={spec.pp}",
            "training.global_batch_size",
        )
    if not 0 <= spec.min_lr <= spec.lr:
        raise _bad("optimizer.min_lr must be between 0 and optimizer.lr", "optimizer.min_lr")
    decay = spec.lr_decay_iters or spec.train_iters
    if not 0 <= spec.lr_warmup_iters < decay:
        raise _bad(
            f"optimizer.lr_warmup_iters ({spec.lr_warmup_iters}) must be >= 0 and below the decay steps "
            f"({decay}: "
            "optimizer.lr_decay_iters, or training.train_iters when unset)",
            "optimizer.lr_warmup_iters",
        )
    if not spec.peak_tflops_per_worker >= 0:
        raise _bad(
            "resources.peak_tflops_per_worker must be >= 0 (0 = measured at start)",
            "resources.peak_tflops_per_worker",
        )
    if spec.evaluate is not None:
        _check_evaluate(spec.evaluate)
    check_resources(spec)
    if not spec.data_paths:
        raise _bad("data.paths needs at least one dataset prefix", "data.paths")
    if any(w <= 0 for _, w in spec.data_paths):
        raise _bad("data.paths weights must be > 0", "data.paths")
    parts = spec.split.split(",")
    if (
        len(parts) != 3
        or not all(p.strip().replace(".", "", 1).isdigit() for p in parts)
        or sum(map(float, parts)) <= 0
    ):
        raise _bad(
            f"data.split {spec.split!r} must be three non-negative weights like '98,1,1'", "data.split"
        )
    if spec.valid_data_paths and spec.kind != "sft":
        raise _bad(
            "data.valid_paths is for SFT; pretraining validates on the data.split part of data.paths",
            "data.valid_paths",
        )
    if any(w <= 0 for _, w in spec.valid_data_paths):
        raise _bad("data.valid_paths weights must be > 0", "data.valid_paths")
    for field_name, paths in (("data.paths", spec.data_paths), ("data.valid_paths", spec.valid_data_paths)):
        for prefix in _prefixes(spec.kind, paths):
            for ext in (".bin", ".idx"):
                if not Path(prefix + ext).is_file():
                    raise _bad(f"data path {prefix}{ext} does not exist", field_name)
    from llm.indexed_dataset import IndexedDatasetReader
    from services.trainer.datafiles import split_documents

    held_out = not spec.valid_data_paths  # validation on a part of data.paths that training never reads
    for p, _ in spec.data_paths:
        prefix = f"{p}_packed_input_ids_document" if spec.kind == "sft" else p
        docs = IndexedDatasetReader(prefix).num_documents
        train, valid, _ = split_documents(spec.split, docs) if held_out else (docs, 0, 0)
        if train == 0:
            raise _bad(
                f"data.split {spec.split} leaves no training documents of the {docs} in {prefix}",
                "data.split",
            )
        if spec.eval_interval and held_out and valid == 0:
            raise _bad(
                f"data.split {spec.split} leaves no validation documents of the {docs} in {prefix}, but "
                "training.eval_interval asks for evaluation (give the valid split more weight, or "
                "eval_interval 0)",
                "data.split",
            )
    if spec.kind == "sft" and spec.transformer_impl == "transformer_engine":
        from services.trainer.datafiles import neat_packed

        if neat_packed([p for p, _ in (*spec.data_paths, *spec.valid_data_paths)]):
            raise _bad(NEAT_PACK_TE, "training.transformer_impl")
    arch, padded, tok = resolve_arch(spec)
    check_moe(spec, arch)
    if arch.sliding_window is not None and spec.seq_length > arch.sliding_window:
        raise _bad(
            f"the model attends over a sliding window of {arch.sliding_window} positions (sliding_window), "
            "which megatron-core's local layer spec cannot express: train with data.seq_length <= "
            f"{arch.sliding_window} (the window then covers every sequence), got {spec.seq_length}",
            "data.seq_length",
        )
    from llm.checkpoints import layout as L
    from llm.mcore.model import padded_vocab_size

    try:
        L.check_tp(arch, spec.tp)
    except InvalidArgument as e:  # the converter's field name, said in the spec's
        raise _bad(e.message, "parallel.tensor_parallel") from None
    try:
        L.PipelineLayout.build(
            arch.num_layers,
            spec.pp,
            num_layer_list=list(spec.num_layer_list) or None,
            layers_per_virtual_stage=(arch.num_layers // spec.pp // spec.vpp) if spec.vpp > 1 else 0,
        )
    except InvalidArgument as e:  # the layout's own words, with the spec's field names
        raise _bad(
            e.message.replace("--num-layer-list", "parallel.num_layer_list"),
            LAYOUT_FIELDS.get(e.field, "parallel"),
        ) from None
    if spec.num_layer_list:
        if spec.pp < 2:
            raise _bad("parallel.num_layer_list needs pipeline_parallel >= 2", "parallel.num_layer_list")
        middle = spec.num_layer_list[1:-1]
        if (
            len(set(middle)) > 1
        ):  # megatron-core sets the first and last stage; the others share the rest evenly
            raise _bad(
                f"parallel.num_layer_list {list(spec.num_layer_list)}: the stages between the first and the "
                "last "
                f"must have equal layer counts (megatron-core splits them evenly), got {list(middle)}",
                "parallel.num_layer_list",
            )
    if spec.vpp > 1 and arch.num_layers % (spec.pp * spec.vpp):
        raise _bad(
            f"{arch.num_layers} layers do not split into pipeline_parallel x virtual_pipeline = "
            f"{spec.pp * spec.vpp} chunks",
            "parallel.virtual_pipeline",
        )
    if (
        spec.sequence_parallel and spec.seq_length % spec.tp
    ):  # megatron-core splits the sequence over the TP ranks
        raise _bad(
            f"data.seq_length {spec.seq_length} must be a multiple of tensor_parallel={spec.tp} with "
            "sequence "
            "parallelism",
            "data.seq_length",
        )
    if spec.seq_length > arch.max_position_embeddings:
        raise _bad(
            f"data.seq_length {spec.seq_length} exceeds the model's {arch.max_position_embeddings} positions",
            "data.seq_length",
        )
    if padded is not None and padded != padded_vocab_size(arch.vocab_size, 128, spec.tp):
        raise _bad(
            f"model.init_from was converted for a different TP (vocab padded to {padded}); convert it again "
            "with "
            f"--target-tensor-parallel-size {spec.tp}",
            "model.init_from",
        )
    if tok is None or not Path(tok).is_dir():
        raise _bad("no tokenizer: set model.tokenizer (the init checkpoint carries none)", "model.tokenizer")


def check_moe(spec: TrainSpec, arch) -> None:
    """The mixture-of-experts settings against the model and the layout, each refusal naming its field."""
    from llm.checkpoints import layout as L

    if not arch.moe:
        for value, name in (
            (spec.ep > 1, "parallel.expert_parallel"),
            (spec.moe_aux_loss_coeff, "training.moe_aux_loss_coeff"),
            (spec.moe_grouped_gemm, "training.moe_grouped_gemm"),
            (spec.moe_capacity_factor, "training.moe_capacity_factor"),
        ):
            if value:
                raise _bad(f"{name} applies to mixture-of-experts models; {arch.architecture} is dense", name)
        return
    try:
        L.check_ep(arch, spec.ep)
    except InvalidArgument as e:
        raise _bad(e.message, "parallel.expert_parallel") from None
    if spec.dp % spec.ep:  # megatron-core carves the expert-parallel groups out of the data-parallel ranks
        raise _bad(
            f"parallel.expert_parallel {spec.ep} must divide data_parallel {spec.dp} (the experts are split "
            "over data-parallel ranks)",
            "parallel.expert_parallel",
        )
    for value, name in (
        (spec.moe_aux_loss_coeff, "training.moe_aux_loss_coeff"),
        (spec.moe_capacity_factor, "training.moe_capacity_factor"),
    ):
        if value < 0:
            raise _bad(f"{name} must be >= 0", name)
    if spec.moe_grouped_gemm and spec.gpus_per_worker <= 0:
        raise _bad(
            "training.moe_grouped_gemm runs the experts as one grouped GEMM, a GPU kernel: set "
            "resources.gpus_per_worker, or leave it off on CPU ranks (the experts then run one after "
            "another)",
            "training.moe_grouped_gemm",
        )


def absolutize(spec: TrainSpec, base: Path | None = None) -> TrainSpec:
    """Relative paths of a spec made absolute (against ``base``, default the current folder): the ranks run
    wherever Ray starts them, so a spec must not depend on the submitter's working directory."""
    import dataclasses

    root = Path(base or Path.cwd())

    def fix(p: str) -> str:
        return p if not p or Path(p).is_absolute() else str(root / p)

    return dataclasses.replace(
        spec,
        init_from=fix(spec.init_from),
        architecture=fix(spec.architecture),
        tokenizer=fix(spec.tokenizer),
        hf_model=fix(spec.hf_model),
        export_hf_dir=fix(spec.export_hf_dir),
        data_files=tuple(fix(p) for p in spec.data_files),
        valid_data_files=tuple(fix(p) for p in spec.valid_data_files),
        save_dir=fix(spec.save_dir),
        data_cache_dir=fix(spec.data_cache_dir),
        data_paths=tuple((fix(p), w) for p, w in spec.data_paths),
        valid_data_paths=tuple((fix(p), w) for p, w in spec.valid_data_paths),
    )
