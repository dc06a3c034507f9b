"""Megatron-LM ``pretrain_gpt.py`` flag lists (optionally behind a ``torchrun`` launcher) -> a TrainJobSpec
document, every flag accounted for (mapped, no effect, or not mapped)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tools.cli.import_common import Imported, bad, one, te_where, tokenizer_vocab


def _attention_flags(imp: Imported, seen: dict[str, list[str]]) -> None:
    """--transformer-impl, --use-flash-attn, --attention-backend: all decide the attention kernels."""
    impl = one("transformer-impl", seen.pop("transformer-impl"), str) if "transformer-impl" in seen else None
    if impl is not None:
        if impl not in ("transformer_engine", "local"):
            raise bad(f"--transformer-impl {impl}: Megatron accepts transformer_engine or local")
        imp.set(
            "training.transformer_impl",
            "auto" if impl == "transformer_engine" else "local",
            f"--transformer-impl {impl}",
            note=te_where(),
        )
    local = impl == "local"
    if "use-flash-attn" in seen:
        seen.pop("use-flash-attn")
        imp.mapped.append(
            (
                "--use-flash-attn",
                "flash attention comes with the Transformer Engine spec: "
                + ("not used (--transformer-impl local)" if local else f"used where TE imports {te_where()}"),
            )
        )
    if "attention-backend" in seen:
        v = one("attention-backend", seen.pop("attention-backend"), str)
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
    "moe-token-dispatcher-type": "megastack dispatches tokens to their experts' ranks with all-to-all",
    "moe-permute-fusion": "kernel fusion setting",
    "moe-router-dtype": "numerics detail of the router's GEMM",
    "moe-layer-recompute": "megastack recomputes whole layers with recompute: full",
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
            raise bad(
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
            raise bad(f"--{pairs[-1][0]} takes no value, but {tok!r} follows it")
        else:
            launcher.append(tok)
    return pairs, launcher


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
    "num-experts": int,
    "moe-router-topk": int,
    "moe-ffn-hidden-size": int,
    "moe-shared-expert-intermediate-size": int,
}
ARCH_BOOLS = {
    "qk-layernorm",
    "moe-router-pre-softmax",
    "moe-shared-expert-gate",
    "moe-use-shared-expert-gate",  # Pai's name (Qwen2-MoE's sigmoid-gated shared expert)
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
    "expert-model-parallel-size": ("parallel.expert_parallel", int),
    "moe-aux-loss-coeff": ("training.moe_aux_loss_coeff", float),
    "moe-expert-capacity-factor": ("training.moe_capacity_factor", float),
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
        raise bad("no --flags found: give the pretrain_gpt.py argument list")
    seen: dict[str, list[str]] = {}
    for flag, values in pairs:
        if flag in seen and flag not in TORCHRUN:
            raise bad(f"--{flag} is given twice ({' '.join(seen[flag])} and {' '.join(values)})")
        seen[flag] = values
    imp = Imported("megatron", {"name": name or "imported", "kind": "pretrain"})
    for tok in launcher:
        imp.no_effect.append((tok, "launcher: megastack runs the ranks on Ray"))

    # launcher arguments -> world size -> data parallel
    launch_items = [
        f"--{f} {' '.join(seen[f])}" for f in ("nproc_per_node", "nproc-per-node", "nnodes") if f in seen
    ]
    nproc = one("nproc_per_node", seen.pop("nproc_per_node", seen.pop("nproc-per-node", ["1"])), int)
    nnodes = int(one("nnodes", seen.pop("nnodes", ["1"])).split(":")[-1])
    for f in [f for f in seen if f in TORCHRUN]:
        imp.no_effect.append(
            (f"--{f} {' '.join(seen.pop(f))}".strip(), "rendezvous is Ray's (placement group)")
        )
    world = world_size or (nproc * nnodes if nproc * nnodes > 1 else 0)

    arch_ns: dict[str, Any] = {}
    for flag in list(seen):
        values = seen[flag]
        if flag in ARCH_ARGS:
            arch_ns[flag.replace("-", "_")] = one(flag, values, ARCH_ARGS[flag])
            seen.pop(flag)
            imp.mapped.append((f"--{flag} {values[0]}", "model architecture"))
        elif flag in ARCH_BOOLS:
            arch_ns[flag.replace("-", "_")] = True
            seen.pop(flag)
            imp.mapped.append((f"--{flag}", "model architecture"))
        elif flag in SIMPLE:
            path, kind = SIMPLE[flag]
            imp.set(path, one(flag, values, kind), f"--{flag} {values[0] if values else ''}".strip())
            seen.pop(flag)
    if "fp16" in seen and "bf16" in seen:
        raise bad("--fp16 and --bf16 contradict each other")
    for p in ("fp16", "bf16"):
        if seen.pop(p, None) is not None:
            imp.set("training.precision", p, f"--{p}")
    if "recompute-activations" in seen:
        seen.pop("recompute-activations")
        imp.set("training.recompute", "selective", "--recompute-activations")
    if "recompute-granularity" in seen:
        g = one("recompute-granularity", seen.pop("recompute-granularity"))
        if g not in ("full", "selective"):
            raise bad(f"--recompute-granularity {g!r}: expected full or selective")
        if imp.doc.get("training", {}).get("recompute") not in (None, g):
            raise bad(
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
        ("moe-grouped-gemm", "training.moe_grouped_gemm"),
    ):
        if seen.pop(f, None) is not None:
            imp.set(key, True, f"--{f}")
    if "num-layers-per-virtual-pipeline-stage" in seen:
        per = one(
            "num-layers-per-virtual-pipeline-stage", seen.pop("num-layers-per-virtual-pipeline-stage"), int
        )
        pp = imp.doc.get("parallel", {}).get("pipeline_parallel", 1)
        layers = arch_ns.get("num_layers")
        if not layers or layers % (pp * per):
            raise bad(
                f"--num-layers-per-virtual-pipeline-stage {per} does not divide {layers} layers over PP={pp}"
            )
        imp.set(
            "parallel.virtual_pipeline",
            layers // (pp * per),
            f"--num-layers-per-virtual-pipeline-stage {per}",
        )
    if "lr-warmup-fraction" in seen:
        if "lr_warmup_iters" in imp.doc.get("optimizer", {}):
            raise bad("--lr-warmup-fraction and --lr-warmup-iters contradict each other (give one)")
        frac = one("lr-warmup-fraction", seen.pop("lr-warmup-fraction"), float)
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
            raise bad(
                f"--data-path: expected PREFIX or 'WEIGHT PREFIX WEIGHT PREFIX ...', got {' '.join(vals)}"
            )
        imp.set("data.paths", paths, f"--data-path {' '.join(vals)}")
    _tokenizer_flags(imp, seen)
    load = seen.pop("load", None)
    save = imp.doc.get("checkpoint", {}).get("save_dir")
    finetune = [f for f in ("no-load-optim", "no-load-rng", "finetune") if seen.pop(f, None) is not None]
    if load is not None:
        path = one("load", load)
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
            v = one(f, seen.pop(f), float)
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
            v = one(f, seen.pop(f), float)
            (imp.mapped if v == 0 else imp.unmapped).append(
                (
                    f"--{f} {v}",
                    "megastack trains without dropout" if v == 0 else "megastack trains without dropout",
                )
            )
    if "rotary-percent" in seen:
        v = one("rotary-percent", seen.pop("rotary-percent"), float)
        (imp.mapped if v == 1.0 else imp.unmapped).append(
            (
                f"--rotary-percent {v}",
                "full rotary embeddings" if v == 1.0 else "partial rotary embeddings are not supported",
            )
        )
    _attention_flags(imp, seen)
    _moe_flags(imp, seen)
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
            raise bad(
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


def _moe_flags(imp: Imported, seen: dict[str, list[str]]) -> None:
    """The router settings megastack has one answer for: the aux-loss balancing, every token kept."""
    if "moe-router-load-balancing-type" in seen:
        v = one("moe-router-load-balancing-type", seen.pop("moe-router-load-balancing-type"))
        (imp.mapped if v in ("aux_loss", "none") else imp.unmapped).append(
            (
                f"--moe-router-load-balancing-type {v}",
                "the aux loss, weighted by training.moe_aux_loss_coeff"
                if v in ("aux_loss", "none")
                else "megastack balances experts with the aux loss only",
            )
        )
    for flag, fine, why in (
        (
            "moe-router-score-function",
            ("softmax",),
            "the router's softmax (sigmoid routing is not supported)",
        ),
        ("moe-layer-freq", ("1",), "every layer a mixture of experts (mixed dense layers are not supported)"),
    ):
        if flag in seen:
            v = one(flag, seen.pop(flag))
            ok = v in fine or (flag == "moe-layer-freq" and v.strip("'\"").startswith("([1]*"))
            (imp.mapped if ok else imp.unmapped).append((f"--{flag} {v}", why))
    if "moe-token-drop-policy" in seen:
        v = one("moe-token-drop-policy", seen.pop("moe-token-drop-policy"))
        (imp.mapped if v == "probs" else imp.unmapped).append(
            (
                f"--moe-token-drop-policy {v}",
                "beyond capacity, the lowest-probability tokens are dropped"
                if v == "probs"
                else "megastack drops the lowest-probability tokens (probs) only",
            )
        )


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _tokenizer_flags(imp: Imported, seen: dict[str, list[str]]) -> None:
    ttype = one("tokenizer-type", seen.pop("tokenizer-type")) if "tokenizer-type" in seen else None
    vocab = one("vocab-file", seen.pop("vocab-file")) if "vocab-file" in seen else None
    merges = one("merge-file", seen.pop("merge-file")) if "merge-file" in seen else None
    model = one("tokenizer-model", seen.pop("tokenizer-model")) if "tokenizer-model" in seen else None
    if ttype not in (None, "GPT2BPETokenizer", "HuggingFaceTokenizer", "PretrainedFromHF"):
        imp.unmapped.append(
            (f"--tokenizer-type {ttype}", "megastack reads GPT-2 BPE files or HF tokenizer folders")
        )
        return
    if vocab or merges or ttype == "GPT2BPETokenizer":
        if not (vocab and merges):
            raise bad("GPT2BPETokenizer needs both --vocab-file and --merge-file")
        if Path(vocab).parent != Path(merges).parent:
            raise bad(
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
        raise bad(f"an architecture needs {', '.join(missing)}")
    ns = dict(ns)
    if ns.pop("use_rotary_position_embeddings", False):
        ns.setdefault("position_embedding_type", "rope")
    ns["add_bias_linear"] = not ns.pop("disable_bias_linear", False)
    vocab = ns.pop("vocab_size", None) or tokenizer_vocab(imp.doc.get("model", {}).get("tokenizer"))
    if not vocab:
        raise bad(
            "the vocabulary size is unknown: give --vocab-size, or a tokenizer (--vocab-file/--merge-file or "
            "--tokenizer-model) that exists here"
        )
    ns["true_vocab_size"] = vocab
    if "layernorm_epsilon" in ns:
        ns.setdefault("norm_epsilon", ns.pop("layernorm_epsilon"))
    arch = arch_from_args(argparse.Namespace(**ns), "the imported flags")
    return family(arch.family).hf_config_from_arch(arch)
