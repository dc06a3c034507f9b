"""Turn existing Megatron / Pai-Megatron-Patch command lines into a TrainJobSpec document.

Three layouts:
- ``megatron``: a ``pretrain_gpt.py`` flag list (Megatron-LM's ``examples/gpt3/train_gpt2_345m_*.sh``),
  optionally with the ``torchrun`` launcher arguments in front (they give the world size);
- ``pai-qwen2.5``: the 25 positional arguments of Pai-Megatron-Patch ``examples/qwen2_5/run_mcore_qwen.sh``;
- ``pai-llama2``: the 24 positional arguments of ``examples/llama2/run_pretrain_megatron_llama.sh``.

Every input item ends in exactly one of three lists: mapped (where it went in the spec), no effect in
megastack (with the reason), or not mapped (megastack cannot honour it). Nothing is dropped silently;
the caller refuses to write a spec with unmapped items unless told to.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import InvalidArgument

FORMATS = ("auto", "megatron", "pai-qwen2.5", "pai-llama2")


@dataclass
class Imported:
    source: str  # which layout was read
    doc: dict[str, Any]  # TrainJobSpec document (YAML sections)
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (item, where it went)
    no_effect: list[tuple[str, str]] = field(default_factory=list)  # (item, why)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (item, why not)
    hf_config: dict[str, Any] | None = None  # architecture to write next to the spec (training from scratch)

    def set(self, path: str, value: Any, item: str, note: str = "") -> None:
        section, _, key = path.rpartition(".")
        target = self.doc
        for part in section.split(".") if section else []:
            target = target.setdefault(part, {})
        target[key] = value
        self.mapped.append((item, f"{path}: {value}" + (f" {note}" if note else "")))


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, field="args")


def _te_where() -> str:
    """What a job with ``transformer_impl: auto`` will do, said for the training nodes and for this
    machine."""
    import importlib.util

    here = "importable" if importlib.util.find_spec("transformer_engine") else "not installed"
    return (
        "(training nodes: Transformer Engine spec where transformer_engine imports with CUDA, else "
        "megatron-core's "
        f"local spec with unfused attention, said in the job log; on this machine TE is {here})"
    )


def _attention_flags(imp: Imported, seen: dict[str, list[str]]) -> None:
    """--transformer-impl, --use-flash-attn, --attention-backend: all decide the attention kernels."""
    impl = _one("transformer-impl", seen.pop("transformer-impl"), str) if "transformer-impl" in seen else None
    if impl is not None:
        if impl not in ("transformer_engine", "local"):
            raise _bad(f"--transformer-impl {impl}: Megatron accepts transformer_engine or local")
        imp.set(
            "training.transformer_impl",
            "auto" if impl == "transformer_engine" else "local",
            f"--transformer-impl {impl}",
            note=_te_where(),
        )
    local = impl == "local"
    if "use-flash-attn" in seen:
        seen.pop("use-flash-attn")
        imp.mapped.append(
            (
                "--use-flash-attn",
                "flash attention comes with the Transformer Engine spec: "
                + (
                    "not used (--transformer-impl local)" if local else f"used where TE imports {_te_where()}"
                ),
            )
        )
    if "attention-backend" in seen:
        v = _one("attention-backend", seen.pop("attention-backend"), str)
        (imp.mapped if v in ("auto", "flash", "fused") else imp.unmapped).append(
            (
                f"--attention-backend {v}",
                "Transformer Engine picks flash or fused attention itself"
                if v in ("auto", "flash", "fused")
                else "megastack does not pin TE's attention backend (it picks flash or fused where it can)",
            )
        )


# -- Megatron flag lists ---------------------------------------------------------------------------
LAUNCHERS = {"torchrun", "python", "python3", "deepspeed"}
TORCHRUN = {
    "nproc_per_node",
    "nproc-per-node",
    "nnodes",
    "node_rank",
    "node-rank",
    "master_addr",
    "master-addr",
    "master_port",
    "master-port",
    "rdzv_endpoint",
    "rdzv-endpoint",
    "rdzv_backend",
    "rdzv-backend",
    "standalone",
}
BOOL_FLAGS = {
    "group-query-attention",
    "swiglu",
    "disable-bias-linear",
    "add-qkv-bias",
    "untie-embeddings-and-output-weights",
    "use-rotary-position-embeddings",
    "sequence-parallel",
    "use-distributed-optimizer",
    "fp16",
    "bf16",
    "recompute-activations",
    "no-load-optim",
    "no-load-rng",
    "finetune",
    "use-flash-attn",
    "use-mcore-models",
    "no-masked-softmax-fusion",
    "no-bias-swiglu-fusion",
    "no-bias-dropout-fusion",
    "no-rope-fusion",
    "no-gradient-accumulation-fusion",
    "overlap-grad-reduce",
    "overlap-param-gather",
    "tp-comm-overlap",
    "cross-entropy-loss-fusion",
    "log-throughput",
    "log-timers-to-tensorboard",
    "log-validation-ppl-to-tensorboard",
    "log-batch-size-to-tensorboard",
    "log-progress",
    "log-num-zeros-in-grad",
    "log-params-norm",
    "use-cpu-initialization",
    "attention-softmax-in-fp32",
    "accumulate-allreduce-grads-in-fp32",
    "apply-query-key-layer-scaling",
    "no-save-optim",
    "no-save-rng",
    "mock-data",
    "qk-layernorm",
    "use-checkpoint-args",
    "exit-on-missing-checkpoint",
    "no-async-tensor-model-parallel-allreduce",
    "calculate-per-token-loss",
    "eod-mask-loss",
    "reset-position-ids",
    "reset-attention-mask",
    "standalone",
    "no-create-attention-mask-in-dataloader",
    "use-legacy-models",
    "async-save",
}
NO_EFFECT = {
    "use-mcore-models": "megastack always trains megatron-core models",
    "no-masked-softmax-fusion": "kernel fusion setting",
    "no-bias-swiglu-fusion": "kernel fusion setting",
    "no-bias-dropout-fusion": "kernel fusion setting",
    "no-rope-fusion": "kernel fusion setting",
    "no-gradient-accumulation-fusion": "kernel fusion setting",
    "cross-entropy-loss-fusion": "kernel fusion setting",
    "overlap-grad-reduce": "communication overlap is a performance setting",
    "overlap-param-gather": "communication overlap is a performance setting",
    "tp-comm-overlap": "communication overlap is a performance setting",
    "attention-softmax-in-fp32": "numerics detail of fused kernels",
    "accumulate-allreduce-grads-in-fp32": "megastack reduces gradients in fp32",
    "apply-query-key-layer-scaling": "fp16 kernel detail",
    "use-cpu-initialization": "initialisation placement",
    "num-workers": "data loading runs in the rank process",
    "dataloader-type": "megastack's sampler is resumable and sequential",
    "tensorboard-dir": "TensorBoard logs go to <save_dir>/tensorboard",
    "tensorboard-queue-size": "logging detail",
    "log-throughput": "tokens/s and GFLOP/s are always reported",
    "log-timers-to-tensorboard": "logging detail",
    "log-validation-ppl-to-tensorboard": "logging detail",
    "log-batch-size-to-tensorboard": "logging detail",
    "log-progress": "progress is in megastack-status.json",
    "log-num-zeros-in-grad": "logging detail",
    "log-params-norm": "logging detail",
    "timing-log-level": "logging detail",
    "distributed-backend": "NCCL with GPUs, else gloo",
    "no-save-optim": "megastack checkpoints always hold the optimizer (exact resume)",
    "no-save-rng": "megastack checkpoints always hold the RNG state (exact resume)",
    "ckpt-format": "megastack writes torch_dist",
    "use-checkpoint-args": "the architecture comes from the spec",
    "exit-on-missing-checkpoint": "a missing model.init_from fails validation",
    "no-async-tensor-model-parallel-allreduce": "communication detail",
    "use-legacy-models": "megastack trains megatron-core models",
    "make-vocab-size-divisible-by": "megastack pads the vocabulary to a multiple of 128 x TP",
    "no-create-attention-mask-in-dataloader": "the causal mask is built by megatron-core",
}


def parse_flags(tokens: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(flag, values) pairs in order, and the launcher tokens before the first flag."""
    pairs: list[tuple[str, list[str]]] = []
    launcher: list[str] = []
    for tok in tokens:
        if tok.startswith("$"):
            raise _bad(
                f"unresolved shell variable {tok}: paste the command line as it runs (after `echo "
                f"${{run_cmd}}`), "
                "or substitute the value"
            )
        if tok.endswith(".py") or (not pairs and tok in LAUNCHERS):
            launcher.append(tok)  # the launcher and the script it runs
        elif tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            pairs.append((name, [value] if eq else []))
        elif pairs and not (pairs[-1][0] in BOOL_FLAGS and not pairs[-1][1]):
            pairs[-1][1].append(tok)
        elif pairs:
            raise _bad(f"--{pairs[-1][0]} takes no value, but {tok!r} follows it")
        else:
            launcher.append(tok)
    return pairs, launcher


def _one(flag: str, values: list[str], kind=str):
    if len(values) != 1:
        raise _bad(f"--{flag} needs exactly one value, got {len(values)}: {' '.join(values) or '(none)'}")
    try:
        return kind(values[0])
    except ValueError:
        raise _bad(f"--{flag} {values[0]!r} is not a valid {kind.__name__}") from None


ARCH_ARGS = {
    "num-layers": int,
    "hidden-size": int,
    "num-attention-heads": int,
    "ffn-hidden-size": int,
    "kv-channels": int,
    "num-query-groups": int,
    "max-position-embeddings": int,
    "normalization": str,
    "norm-epsilon": float,
    "layernorm-epsilon": float,
    "position-embedding-type": str,
    "rotary-base": float,
    "vocab-size": int,
}
ARCH_BOOLS = {
    "group-query-attention",
    "swiglu",
    "disable-bias-linear",
    "add-qkv-bias",
    "untie-embeddings-and-output-weights",
    "use-rotary-position-embeddings",
}
SIMPLE = {  # flag -> (spec path, type)
    "tensor-model-parallel-size": ("parallel.tensor_parallel", int),
    "pipeline-model-parallel-size": ("parallel.pipeline_parallel", int),
    "lr": ("optimizer.lr", float),
    "min-lr": ("optimizer.min_lr", float),
    "weight-decay": ("optimizer.weight_decay", float),
    "clip-grad": ("optimizer.clip_grad", float),
    "adam-beta1": ("optimizer.adam_beta1", float),
    "adam-beta2": ("optimizer.adam_beta2", float),
    "adam-eps": ("optimizer.adam_eps", float),
    "lr-warmup-iters": ("optimizer.lr_warmup_iters", int),
    "lr-decay-iters": ("optimizer.lr_decay_iters", int),
    "lr-decay-style": ("optimizer.lr_decay_style", str),
    "micro-batch-size": ("training.micro_batch_size", int),
    "global-batch-size": ("training.global_batch_size", int),
    "train-iters": ("training.train_iters", int),
    "log-interval": ("training.log_interval", int),
    "eval-interval": ("training.eval_interval", int),
    "eval-iters": ("training.eval_iters", int),
    "seed": ("training.seed", int),
    "save": ("checkpoint.save_dir", str),
    "save-interval": ("checkpoint.save_interval", int),
    "split": ("data.split", str),
    "seq-length": ("data.seq_length", int),
}


def import_megatron(tokens: list[str], *, name: str = "", world_size: int = 0) -> Imported:
    pairs, launcher = parse_flags(tokens)
    if not pairs:
        raise _bad("no --flags found: give the pretrain_gpt.py argument list")
    seen: dict[str, list[str]] = {}
    for flag, values in pairs:
        if flag in seen and flag not in TORCHRUN:
            raise _bad(f"--{flag} is given twice ({' '.join(seen[flag])} and {' '.join(values)})")
        seen[flag] = values
    imp = Imported("megatron", {"name": name or "imported", "kind": "pretrain"})
    for tok in launcher:
        imp.no_effect.append((tok, "launcher: megastack runs the ranks on Ray"))

    # launcher arguments -> world size -> data parallel
    launch_items = [
        f"--{f} {' '.join(seen[f])}" for f in ("nproc_per_node", "nproc-per-node", "nnodes") if f in seen
    ]
    nproc = _one("nproc_per_node", seen.pop("nproc_per_node", seen.pop("nproc-per-node", ["1"])), int)
    nnodes = int(_one("nnodes", seen.pop("nnodes", ["1"])).split(":")[-1])
    for f in [f for f in seen if f in TORCHRUN]:
        imp.no_effect.append(
            (f"--{f} {' '.join(seen.pop(f))}".strip(), "rendezvous is Ray's (placement group)")
        )
    world = world_size or (nproc * nnodes if nproc * nnodes > 1 else 0)

    arch_ns: dict[str, Any] = {}
    for flag in list(seen):
        values = seen[flag]
        if flag in ARCH_ARGS:
            arch_ns[flag.replace("-", "_")] = _one(flag, values, ARCH_ARGS[flag])
            seen.pop(flag)
            imp.mapped.append((f"--{flag} {values[0]}", "model architecture"))
        elif flag in ARCH_BOOLS:
            arch_ns[flag.replace("-", "_")] = True
            seen.pop(flag)
            imp.mapped.append((f"--{flag}", "model architecture"))
        elif flag in SIMPLE:
            path, kind = SIMPLE[flag]
            imp.set(path, _one(flag, values, kind), f"--{flag} {values[0] if values else ''}".strip())
            seen.pop(flag)
    if "fp16" in seen and "bf16" in seen:
        raise _bad("--fp16 and --bf16 contradict each other")
    for p in ("fp16", "bf16"):
        if seen.pop(p, None) is not None:
            imp.set("training.precision", p, f"--{p}")
    if "recompute-activations" in seen:
        seen.pop("recompute-activations")
        imp.set("training.recompute", "selective", "--recompute-activations")
    if "recompute-granularity" in seen:
        g = _one("recompute-granularity", seen.pop("recompute-granularity"))
        if g not in ("full", "selective"):
            raise _bad(f"--recompute-granularity {g!r}: expected full or selective")
        if imp.doc.get("training", {}).get("recompute") not in (None, g):
            raise _bad(
                "--recompute-activations (selective) and --recompute-granularity full contradict each other"
            )
        imp.set("training.recompute", g, f"--recompute-granularity {g}")
    for f in ("recompute-method", "recompute-num-layers"):
        if f in seen:
            imp.no_effect.append(
                (
                    f"--{f} {' '.join(seen.pop(f))}",
                    "megastack recomputes every layer uniformly with recompute: full",
                )
            )
    for f, key in (
        ("sequence-parallel", "parallel.sequence_parallel"),
        ("use-distributed-optimizer", "parallel.distributed_optimizer"),
        ("async-save", "checkpoint.async_save"),
    ):
        if seen.pop(f, None) is not None:
            imp.set(key, True, f"--{f}")
    if "num-layers-per-virtual-pipeline-stage" in seen:
        per = _one(
            "num-layers-per-virtual-pipeline-stage", seen.pop("num-layers-per-virtual-pipeline-stage"), int
        )
        pp = imp.doc.get("parallel", {}).get("pipeline_parallel", 1)
        layers = arch_ns.get("num_layers")
        if not layers or layers % (pp * per):
            raise _bad(
                f"--num-layers-per-virtual-pipeline-stage {per} does not divide {layers} layers over PP={pp}"
            )
        imp.set(
            "parallel.virtual_pipeline",
            layers // (pp * per),
            f"--num-layers-per-virtual-pipeline-stage {per}",
        )
    if "lr-warmup-fraction" in seen:
        if "lr_warmup_iters" in imp.doc.get("optimizer", {}):
            raise _bad("--lr-warmup-fraction and --lr-warmup-iters contradict each other (give one)")
        frac = _one("lr-warmup-fraction", seen.pop("lr-warmup-fraction"), float)
        decay = imp.doc.get("optimizer", {}).get("lr_decay_iters") or imp.doc.get("training", {}).get(
            "train_iters", 0
        )
        imp.set(
            "optimizer.lr_warmup_iters",
            int(frac * decay),
            f"--lr-warmup-fraction {frac} (of {decay} decay steps)",
        )
    if "data-path" in seen:
        vals = seen.pop("data-path")
        if len(vals) == 1:
            paths = [{"prefix": vals[0], "weight": 1.0}]
        elif len(vals) % 2 == 0 and all(_is_number(w) for w in vals[::2]):
            paths = [{"prefix": p, "weight": float(w)} for w, p in zip(vals[::2], vals[1::2])]
        else:
            raise _bad(
                f"--data-path: expected PREFIX or 'WEIGHT PREFIX WEIGHT PREFIX ...', got {' '.join(vals)}"
            )
        imp.set("data.paths", paths, f"--data-path {' '.join(vals)}")
    _tokenizer_flags(imp, seen)
    load = seen.pop("load", None)
    save = imp.doc.get("checkpoint", {}).get("save_dir")
    finetune = [f for f in ("no-load-optim", "no-load-rng", "finetune") if seen.pop(f, None) is not None]
    if load is not None:
        path = _one("load", load)
        if path == save:
            imp.mapped.append(
                (f"--load {path}", "same folder as --save: the job resumes from its own checkpoints")
            )
        else:
            imp.set("model.init_from", path, f"--load {path}")
    for f in finetune:
        imp.mapped.append(
            (f"--{f}", "model.init_from loads weights only (optimizer, RNG and step start fresh)")
        )
    for f in ("init-method-std",):
        if f in seen:
            v = _one(f, seen.pop(f), float)
            (imp.mapped if v == 0.02 else imp.unmapped).append(
                (
                    f"--{f} {v}",
                    "megatron-core's default"
                    if v == 0.02
                    else "megastack initialises with megatron-core's default std 0.02",
                )
            )
    for f in ("attention-dropout", "hidden-dropout"):
        if f in seen:
            v = _one(f, seen.pop(f), float)
            (imp.mapped if v == 0 else imp.unmapped).append(
                (
                    f"--{f} {v}",
                    "megastack trains without dropout" if v == 0 else "megastack trains without dropout",
                )
            )
    if "rotary-percent" in seen:
        v = _one("rotary-percent", seen.pop("rotary-percent"), float)
        (imp.mapped if v == 1.0 else imp.unmapped).append(
            (
                f"--rotary-percent {v}",
                "full rotary embeddings" if v == 1.0 else "partial rotary embeddings are not supported",
            )
        )
    _attention_flags(imp, seen)
    for flag in list(seen):
        values = seen.pop(flag)
        item = f"--{flag} {' '.join(values)}".strip()
        if flag in NO_EFFECT:
            imp.no_effect.append((item, NO_EFFECT[flag]))
        else:
            imp.unmapped.append((item, "not a setting megastack knows"))
    if arch_ns:
        imp.hf_config = _hf_config(arch_ns, imp)
    tp = imp.doc.get("parallel", {}).get("tensor_parallel", 1)
    pp = imp.doc.get("parallel", {}).get("pipeline_parallel", 1)
    if world:
        if world % (tp * pp):
            raise _bad(
                f"world size {world} (torchrun --nproc_per_node x --nnodes) is not a multiple of TP x PP = "
                f"{tp * pp}"
            )
        imp.set(
            "parallel.data_parallel",
            world // (tp * pp),
            f"world size {world} ({' '.join(launch_items) or '--world-size'}) / (TP x PP)",
        )
    elif launch_items:
        imp.mapped.append((" ".join(launch_items), "one rank: data_parallel 1"))
    return imp


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _tokenizer_flags(imp: Imported, seen: dict[str, list[str]]) -> None:
    ttype = _one("tokenizer-type", seen.pop("tokenizer-type")) if "tokenizer-type" in seen else None
    vocab = _one("vocab-file", seen.pop("vocab-file")) if "vocab-file" in seen else None
    merges = _one("merge-file", seen.pop("merge-file")) if "merge-file" in seen else None
    model = _one("tokenizer-model", seen.pop("tokenizer-model")) if "tokenizer-model" in seen else None
    if ttype not in (None, "GPT2BPETokenizer", "HuggingFaceTokenizer", "PretrainedFromHF"):
        imp.unmapped.append(
            (f"--tokenizer-type {ttype}", "megastack reads GPT-2 BPE files or HF tokenizer folders")
        )
        return
    if vocab or merges or ttype == "GPT2BPETokenizer":
        if not (vocab and merges):
            raise _bad("GPT2BPETokenizer needs both --vocab-file and --merge-file")
        if Path(vocab).parent != Path(merges).parent:
            raise _bad(
                f"--vocab-file {vocab} and --merge-file {merges} must be in the same folder (megastack "
                "reads the folder)"
            )
        imp.set("model.tokenizer", str(Path(vocab).parent), f"--vocab-file {vocab} --merge-file {merges}")
        if ttype:
            imp.mapped.append((f"--tokenizer-type {ttype}", "model.tokenizer"))
    elif model:
        imp.set("model.tokenizer", model, f"--tokenizer-model {model}")
        if ttype:
            imp.mapped.append((f"--tokenizer-type {ttype}", "model.tokenizer"))


def _hf_config(ns: dict[str, Any], imp: Imported) -> dict[str, Any]:
    from llm.checkpoints.megatron import arch_from_args
    from llm.models.registry import family

    missing = [
        f"--{k}"
        for k in ("num-layers", "hidden-size", "num-attention-heads")
        if k.replace("-", "_") not in ns
    ]
    if missing:
        raise _bad(f"an architecture needs {', '.join(missing)}")
    ns = dict(ns)
    if ns.pop("use_rotary_position_embeddings", False):
        ns.setdefault("position_embedding_type", "rope")
    ns["add_bias_linear"] = not ns.pop("disable_bias_linear", False)
    vocab = ns.pop("vocab_size", None) or _tokenizer_vocab(imp.doc.get("model", {}).get("tokenizer"))
    if not vocab:
        raise _bad(
            "the vocabulary size is unknown: give --vocab-size, or a tokenizer (--vocab-file/--merge-file or "
            "--tokenizer-model) that exists here"
        )
    ns["true_vocab_size"] = vocab
    if "layernorm_epsilon" in ns:
        ns.setdefault("norm_epsilon", ns.pop("layernorm_epsilon"))
    arch = arch_from_args(argparse.Namespace(**ns), "the imported flags")
    return family(arch.family).hf_config_from_arch(arch)


def _tokenizer_vocab(path: str | None) -> int:
    if not path or not Path(path).exists():
        return 0
    from llm.tokenizers import FastTokenizer

    return FastTokenizer.from_dir(path).vocab_size


# -- Pai-Megatron-Patch positional scripts ----------------------------------------------------------
QWEN25 = {  # size: layers, hidden, heads, ffn, kv groups, max positions, norm eps, tied
    "0.5B": (24, 896, 14, 4864, 2, 32768, 1e-6, True),
    "1.5B": (28, 1536, 12, 8960, 2, 32768, 1e-6, True),
    "3B": (36, 2048, 16, 11008, 2, 32768, 1e-6, True),
    "7B": (28, 3584, 28, 18944, 4, 131072, 1e-6, False),
    "14B": (48, 5120, 40, 13824, 8, 131072, 1e-5, False),
    "32B": (64, 5120, 40, 27648, 8, 131072, 1e-5, False),
    "72B": (80, 8192, 64, 29568, 8, 131072, 1e-5, False),
}
LLAMA2 = {"7B": (32, 4096, 32, 11008, 32), "13B": (40, 5120, 40, 13824, 40), "70B": (80, 8192, 64, 28672, 8)}
QWEN25_ARGS = (
    "ENV",
    "MODEL_SIZE",
    "BATCH_SIZE",
    "GLOBAL_BATCH_SIZE",
    "LR",
    "MIN_LR",
    "SEQ_LEN",
    "PAD_LEN",
    "PR",
    "TP",
    "PP",
    "CP",
    "SP",
    "DO",
    "FL",
    "SFT",
    "AC",
    "OPTIMIZER_OFFLOAD",
    "SAVE_INTERVAL",
    "DATASET_PATH",
    "VALID_DATASET_PATH",
    "PRETRAIN_CHECKPOINT_PATH",
    "TRAIN_TOKENS_OR_ITERS",
    "WARMUP_TOKENS_OR_ITERS",
    "OUTPUT_BASEPATH",
)
LLAMA2_ARGS = (
    "ENV",
    "MEGATRON_PATCH_PATH",
    "MODEL_SIZE",
    "BATCH_SIZE",
    "GLOBAL_BATCH_SIZE",
    "LR",
    "MIN_LR",
    "SEQ_LEN",
    "PAD_LEN",
    "EXTRA_VOCAB_SIZE",
    "PR",
    "TP",
    "PP",
    "AC",
    "DO",
    "FL",
    "SP",
    "TE",
    "SAVE_INTERVAL",
    "DATASET_PATH",
    "PRETRAIN_CHECKPOINT_PATH",
    "TRAIN_TOKENS",
    "WARMUP_TOKENS",
    "OUTPUT_BASEPATH",
)


def _bool(name: str, v: str) -> bool:
    if v not in ("true", "false"):
        raise _bad(f"{name} must be true or false, got {v!r}")
    return v == "true"


def _num(name: str, v: str, kind=int):
    try:
        return kind(v)
    except ValueError:
        raise _bad(f"{name} must be a {kind.__name__}, got {v!r}") from None


def import_pai(
    tokens: list[str], layout: str, *, name: str = "", world_size: int = 0, tokenizer: str = ""
) -> Imported:
    names = QWEN25_ARGS if layout == "pai-qwen2.5" else LLAMA2_ARGS
    if len(tokens) != len(names):
        raise _bad(f"{layout} takes {len(names)} positional arguments ({' '.join(names)}), got {len(tokens)}")
    a = dict(zip(names, tokens))
    for k, v in a.items():
        if v.startswith("$"):
            raise _bad(f"{k} is the unresolved shell variable {v}")
    imp = Imported(layout, {"name": name or f"{layout}-{a['MODEL_SIZE']}".lower(), "kind": "pretrain"})
    if a["ENV"] not in ("dsw", "dlc"):
        raise _bad(f"ENV must be dsw or dlc, got {a['ENV']!r}")
    imp.no_effect.append(
        (f"ENV={a['ENV']}", "the cluster is Ray's; GPUs per rank come from resources.gpus_per_worker")
    )
    if "MEGATRON_PATCH_PATH" in a:
        imp.no_effect.append(
            (f"MEGATRON_PATCH_PATH={a['MEGATRON_PATCH_PATH']}", "megastack brings megatron-core")
        )
    sft = _bool("SFT", a["SFT"]) if "SFT" in a else False
    imp.set("kind", "sft" if sft else "pretrain", f"SFT={a.get('SFT', 'false')}")
    mbs, gbs, seq = (
        _num("BATCH_SIZE", a["BATCH_SIZE"]),
        _num("GLOBAL_BATCH_SIZE", a["GLOBAL_BATCH_SIZE"]),
        _num("SEQ_LEN", a["SEQ_LEN"]),
    )
    imp.set("training.micro_batch_size", mbs, f"BATCH_SIZE={mbs}")
    imp.set("training.global_batch_size", gbs, f"GLOBAL_BATCH_SIZE={gbs}")
    imp.set("optimizer.lr", _num("LR", a["LR"], float), f"LR={a['LR']}")
    imp.set("optimizer.min_lr", _num("MIN_LR", a["MIN_LR"], float), f"MIN_LR={a['MIN_LR']}")
    imp.set("data.seq_length", seq, f"SEQ_LEN={seq}")
    imp.no_effect.append(
        (f"PAD_LEN={a['PAD_LEN']}", "padding length of raw JSON datasets; megastack trains on .bin/.idx")
    )
    pr = a["PR"]
    if pr in ("bf16", "fp16"):
        imp.set("training.precision", pr, f"PR={pr}")
    else:
        imp.unmapped.append(
            (f"PR={pr}", "fp8 training is not supported" if pr == "fp8" else "expected bf16 or fp16")
        )
    tp, pp = _num("TP", a["TP"]), _num("PP", a["PP"])
    imp.set("parallel.tensor_parallel", tp, f"TP={tp}")
    imp.set("parallel.pipeline_parallel", pp, f"PP={pp}")
    if "CP" in a:
        cp = _num("CP", a["CP"])
        (imp.mapped if cp == 1 else imp.unmapped).append(
            (f"CP={cp}", "no context parallelism" if cp == 1 else "context parallelism is not supported")
        )
    sp = _bool("SP", a["SP"])
    if sp and tp > 1:
        imp.set("parallel.sequence_parallel", True, "SP=true")
    else:
        imp.no_effect.append((f"SP={a['SP']}", "sequence parallelism needs TP > 1 (the script drops it too)"))
    imp.set("parallel.distributed_optimizer", _bool("DO", a["DO"]), f"DO={a['DO']}")
    te = _bool("TE", a["TE"]) if "TE" in a else True
    if "TE" in a:
        imp.set("training.transformer_impl", "auto" if te else "local", f"TE={a['TE']}", note=_te_where())
    imp.mapped.append(
        (
            f"FL={a['FL']}",
            f"flash/fused attention comes with the Transformer Engine spec: "
            f"{'used' if te else 'not used (TE=false)'}; {_te_where()}",
        )
    )
    ac = a["AC"]
    if ac in ("full", "sel", "none"):
        imp.set("training.recompute", {"full": "full", "sel": "selective", "none": "none"}[ac], f"AC={ac}")
    else:
        imp.unmapped.append((f"AC={ac}", "activation offloading is not supported"))
    if "OPTIMIZER_OFFLOAD" in a:
        off = a["OPTIMIZER_OFFLOAD"]
        (imp.mapped if off == "false" else imp.unmapped).append(
            (
                f"OPTIMIZER_OFFLOAD={off}",
                "optimizer on the GPU" if off == "false" else "optimizer offloading is not supported",
            )
        )
    if "EXTRA_VOCAB_SIZE" in a:
        imp.no_effect.append(
            (
                f"EXTRA_VOCAB_SIZE={a['EXTRA_VOCAB_SIZE']}",
                "megastack pads the vocabulary itself (multiple of 128 x TP)",
            )
        )
    imp.set(
        "checkpoint.save_interval",
        _num("SAVE_INTERVAL", a["SAVE_INTERVAL"]),
        f"SAVE_INTERVAL={a['SAVE_INTERVAL']}",
    )
    data = a["DATASET_PATH"]
    if data.endswith((".json", ".jsonl")):
        raise _bad(
            f"DATASET_PATH {data} is raw JSON: preprocess it first, e.g. `megastack preprocess --input "
            f"{data} "
            f"--output-prefix <prefix> --tokenizer-name-or-path <hf tokenizer> --append-eod`, and give the "
            "<prefix>_text_document it prints"
        )
    imp.set("data.paths", [{"prefix": data, "weight": 1.0}], f"DATASET_PATH={data}")
    imp.set("data.split", "99,1,0", "the script's --split 99,1,0")
    if "VALID_DATASET_PATH" in a:
        valid = a["VALID_DATASET_PATH"]
        if sft:  # SFT validates on its own set; without one megastack holds out data.split's valid part
            imp.set("data.valid_paths", [{"prefix": valid, "weight": 1.0}], f"VALID_DATASET_PATH={valid}")
        else:
            imp.no_effect.append(
                (
                    f"VALID_DATASET_PATH={valid}",
                    "pretraining validates on the data.split (99,1,0) part of "
                    "DATASET_PATH that it never trains on; validation sets are for SFT",
                )
            )
    ckpt = a["PRETRAIN_CHECKPOINT_PATH"]
    size = a["MODEL_SIZE"]
    if ckpt != "none":
        imp.set("model.init_from", ckpt, f"PRETRAIN_CHECKPOINT_PATH={ckpt}")
        imp.mapped.append((f"MODEL_SIZE={size}", "the architecture is read from the checkpoint"))
    else:
        imp.hf_config = _pai_arch(layout, size, seq, tokenizer)
        imp.mapped.append((f"MODEL_SIZE={size}", "model.architecture (the script's size table)"))
    if tokenizer:
        imp.set("model.tokenizer", tokenizer, f"tokenizer {tokenizer}")
    first, second = (
        (a["TRAIN_TOKENS_OR_ITERS"], a["WARMUP_TOKENS_OR_ITERS"])
        if "TRAIN_TOKENS_OR_ITERS" in a
        else (a["TRAIN_TOKENS"], a["WARMUP_TOKENS"])
    )
    if sft:
        iters, warmup = _num("TRAIN_ITERS", first), _num("LR_WARMUP_ITERS", second)
        imp.set("training.train_iters", iters, f"TRAIN_ITERS={iters}")
        imp.set("optimizer.lr_warmup_iters", warmup, f"LR_WARMUP_ITERS={warmup}")
        imp.set("optimizer.lr_decay_iters", iters - warmup, "TRAIN_ITERS - LR_WARMUP_ITERS (as the script)")
    else:
        tokens, warm = _num("TRAIN_TOKENS", first), _num("WARMUP_TOKENS", second)
        iters = tokens // gbs // seq
        imp.set("training.train_iters", iters, f"TRAIN_TOKENS={tokens} / GLOBAL_BATCH_SIZE / SEQ_LEN")
        imp.set(
            "optimizer.lr_warmup_iters",
            warm // gbs // seq,
            f"WARMUP_TOKENS={warm} / GLOBAL_BATCH_SIZE / SEQ_LEN",
        )
        imp.set("optimizer.lr_decay_iters", iters, "train iterations (as the script)")
    out = a["OUTPUT_BASEPATH"]
    imp.set("checkpoint.save_dir", str(Path(out) / "checkpoint" / imp.doc["name"]), f"OUTPUT_BASEPATH={out}")
    for path, value in (
        ("optimizer.lr_decay_style", "cosine" if layout == "pai-qwen2.5" else "linear"),
        ("optimizer.weight_decay", 0.1),
        ("optimizer.adam_beta1", 0.9),
        ("optimizer.adam_beta2", 0.95),
        ("optimizer.clip_grad", 1.0),
        ("training.log_interval", 1),
        ("training.eval_interval", 10000),
        ("training.eval_iters", 10),
    ):
        imp.set(path, value, "fixed in the script")
    if world_size:
        if world_size % (tp * pp):
            raise _bad(f"--world-size {world_size} is not a multiple of TP x PP = {tp * pp}")
        imp.set("parallel.data_parallel", world_size // (tp * pp), f"world size {world_size} / (TP x PP)")
    imp.set("resources.gpus_per_worker", 1, "one GPU per rank (torchrun --nproc_per_node = GPUs)")
    return imp


def _pai_arch(layout: str, size: str, seq: int, tokenizer: str) -> dict[str, Any]:
    from llm.models.base import ArchConfig
    from llm.models.registry import family

    table = QWEN25 if layout == "pai-qwen2.5" else LLAMA2
    if size not in table:
        raise _bad(f"MODEL_SIZE {size!r} is not in the script's table ({', '.join(table)})")
    vocab = _tokenizer_vocab(tokenizer)
    if not vocab:
        raise _bad(
            "training from scratch (PRETRAIN_CHECKPOINT_PATH=none) needs --tokenizer: the HF tokenizer folder"
        )
    if layout == "pai-qwen2.5":
        layers, hidden, heads, ffn, groups, max_pos, eps, tied = table[size]
        arch = ArchConfig(
            family="qwen2",
            architecture="Qwen2ForCausalLM",
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=hidden // heads,
            ffn_hidden_size=ffn,
            max_position_embeddings=max_pos,
            normalization="RMSNorm",
            norm_eps=eps,
            activation="swiglu",
            position_embedding="rope",
            rope_theta=1e6,
            qkv_bias=True,
            linear_bias=False,
            tie_word_embeddings=tied,
        )
    else:
        layers, hidden, heads, ffn, groups = table[size]
        arch = ArchConfig(
            family="llama",
            architecture="LlamaForCausalLM",
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=hidden // heads,
            ffn_hidden_size=ffn,
            max_position_embeddings=seq,
            normalization="RMSNorm",
            norm_eps=1e-5,
            activation="swiglu",
            position_embedding="rope",
            rope_theta=10000.0,
            qkv_bias=False,
            linear_bias=False,
            tie_word_embeddings=False,
        )
    return family(arch.family).hf_config_from_arch(arch)


def detect(tokens: list[str]) -> str:
    if any(t.startswith("--") for t in tokens):
        return "megatron"
    if tokens and tokens[0] in ("dsw", "dlc"):
        if len(tokens) == len(QWEN25_ARGS):
            return "pai-qwen2.5"
        if len(tokens) == len(LLAMA2_ARGS):
            return "pai-llama2"
    raise _bad(
        f"cannot tell the layout of {len(tokens)} arguments: a Megatron flag list has --flags; Pai's "
        "run_mcore_qwen.sh "
        f"takes {len(QWEN25_ARGS)} positional arguments and run_pretrain_megatron_llama.sh "
        f"{len(LLAMA2_ARGS)}, "
        "both starting with dsw or dlc (or pass --format)"
    )


def import_args(
    tokens: list[str],
    fmt: str = "auto",
    *,
    name: str = "",
    world_size: int = 0,
    tokenizer: str = "",
    gpus_per_worker: float | None = None,
) -> Imported:
    """``gpus_per_worker`` (when given) overrides what the layout implies: Pai's scripts are GPU-only (1 per
    rank);
    0 runs the ranks on CPU (gloo), as on a laptop."""
    tokens = [t for t in tokens if t not in ("\\", "")]
    if fmt not in FORMATS:
        raise _bad(f"format must be one of {', '.join(FORMATS)}")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise InvalidArgument("--gpus-per-worker must be >= 0", field="gpus_per_worker")
    layout = detect(tokens) if fmt == "auto" else fmt
    if layout == "megatron":
        imp = import_megatron(tokens, name=name, world_size=world_size)
        if tokenizer:
            imp.set("model.tokenizer", tokenizer, f"tokenizer {tokenizer}")
    else:
        imp = import_pai(tokens, layout, name=name, world_size=world_size, tokenizer=tokenizer)
    if gpus_per_worker is not None:
        imp.mapped = [m for m in imp.mapped if not m[1].startswith("resources.gpus_per_worker:")]
        imp.set("resources.gpus_per_worker", gpus_per_worker, f"--gpus-per-worker {gpus_per_worker:g}")
    return imp


def split_command_text(text: str) -> list[str]:
    """Tokens of a pasted command line or script fragment (line continuations and comments removed)."""
    import shlex

    text = re.sub(r"\\\n", " ", text)
    text = "\n".join(
        line.split(" #", 1)[0] for line in text.splitlines() if not line.lstrip().startswith("#")
    )
    return shlex.split(text)


def render_yaml(imp: Imported, config_file: str | None) -> str:
    import yaml

    doc = json.loads(json.dumps(imp.doc))
    if config_file:
        doc.setdefault("model", {})["architecture"] = config_file
    order = ["name", "kind", "model", "data", "parallel", "optimizer", "training", "checkpoint", "resources"]
    doc = {k: doc[k] for k in order if k in doc} | {k: v for k, v in doc.items() if k not in order}
    head = [f"# imported by `megastack train import-args` from a {imp.source} command line"]
    if imp.no_effect:
        head.append("# accepted, no effect in megastack:")
        head += [f"#   {item}: {why}" for item, why in imp.no_effect]
    if imp.unmapped:
        head.append("# NOT mapped (megastack cannot honour these; review before training):")
        head += [f"#   {item}: {why}" for item, why in imp.unmapped]
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False)
