"""Pai-Megatron-Patch's HF + DeepSpeed flow -> an ``hf-deepspeed`` TrainJobSpec document.

Two forms of the same job:
- ``pai-ds-llama``: the positional arguments of ``run_ds_train_huggingface_llama.sh`` (the guide's 14:
  ENV MODEL_SIZE BATCH_SIZE GA_STEPS LR SEQ_LEN PR ZERO GC TRAIN_DATASET_PATH VALID_DATASET_PATH
  PRETRAIN_CHECKPOINT_PATH EPOCH OUTPUT_BASEPATH; the script's later 15 add FLASH after GC);
- ``pai-ds-flags``: the flags the script hands ``ds_train_huggingface_llama.py`` (``--load``, ``--save``,
  ``--train-data``, ``--epochs``, ``--gradient-accumulation-steps``, ``--bf16``, ...).

The ZeRO stage travels in the script's ``ds_config.json`` (made from ``ds_config_TEMPLATE.json``), not in
the flags: with ``pai-ds-flags`` it stays at the spec's default unless ``--zero-stage`` is added.
"""

from __future__ import annotations

from pathlib import Path

from tools.cli.import_common import Imported, bad, flag_bool, flag_num, one

DS_ARGS_14 = (
    "ENV",
    "MODEL_SIZE",
    "BATCH_SIZE",
    "GA_STEPS",
    "LR",
    "SEQ_LEN",
    "PR",
    "ZERO",
    "GC",
    "TRAIN_DATASET_PATH",
    "VALID_DATASET_PATH",
    "PRETRAIN_CHECKPOINT_PATH",
    "EPOCH",
    "OUTPUT_BASEPATH",
)
DS_ARGS_15 = (*DS_ARGS_14[:9], "FLASH", *DS_ARGS_14[9:])
DSW_GPUS = 8  # the script's GPUS_PER_NODE on dsw (one node)
ARCH_FLAGS = ("num-layers", "hidden-size", "num-attention-heads", "intermediate-size")
TEMPLATE_NOTE = (
    "ds_config_TEMPLATE.json",
    "its optimizer and scheduler blocks are not read: megastack builds AdamW (no decay on norms and biases) "
    "with the spec's optimizer section (constant LR unless you set lr_warmup_iters / lr_decay_style)",
)


def _flags(tokens: list[str]) -> dict[str, list[str]]:
    """``--flag value...`` groups; a launcher word (``torchrun``, ``python``) before any flag is skipped."""
    out: dict[str, list[str]] = {}
    current = None
    for t in tokens:
        if t.startswith("--"):
            current = t[2:].split("=", 1)[0]
            out.setdefault(current, [])
            if "=" in t:
                out[current].append(t.split("=", 1)[1])
        elif current is None:
            if t not in ("torchrun", "python", "python3", "deepspeed"):
                raise bad(f"{t!r} comes before any --flag")
        else:
            out[current].append(t)
    return out


def is_pai_ds_flags(tokens: list[str]) -> bool:
    return "--train-data" in tokens or "--enable-gradient-checkpointing" in tokens


def _data(imp: Imported, field: str, path: str, item: str) -> None:
    """A file, or a folder of .json/.jsonl files (the script takes both)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix in (".json", ".jsonl"))
        if not files:
            raise bad(f"{item}: the folder {path} holds no .json or .jsonl files")
        imp.set(field, files, item, note=f"(the {len(files)} record files of the folder)")
    else:
        imp.set(field, [path], item)


def _common(imp: Imported, *, mbs: int, ga: int, world: int, lr: str, seq: int, epochs: int) -> None:
    imp.set("training.micro_batch_size", mbs, f"micro batch {mbs}")
    imp.set("training.global_batch_size", mbs * ga * world, f"micro batch x GA_STEPS {ga} x {world} ranks")
    imp.set("parallel.data_parallel", world, f"{world} ranks")
    imp.set("optimizer.lr", flag_num("LR", lr, float), f"LR={lr}")
    imp.set("data.seq_length", seq, f"SEQ_LEN={seq}")
    imp.set("training.epochs", epochs, f"EPOCH={epochs}")
    imp.no_effect.append(TEMPLATE_NOTE)


def _precision(imp: Imported, pr: str, item: str) -> None:
    if pr in ("bf16", "fp16"):
        imp.set("training.precision", pr, item)
    else:
        imp.unmapped.append((item, "expected bf16 or fp16"))


def import_pai_ds(tokens: list[str], *, name: str = "", world_size: int = 0) -> Imported:
    """The positional form (14 or 15 arguments)."""
    names = DS_ARGS_14 if len(tokens) == len(DS_ARGS_14) else DS_ARGS_15
    if len(tokens) != len(names):
        raise bad(
            f"run_ds_train_huggingface_llama.sh takes {len(DS_ARGS_14)} positional arguments "
            f"({' '.join(DS_ARGS_14)}) or {len(DS_ARGS_15)} (with FLASH after GC), got {len(tokens)}"
        )
    a = dict(zip(names, tokens))
    for k, v in a.items():
        if v.startswith("$"):
            raise bad(f"{k} is the unresolved shell variable {v}")
    if a["ENV"] not in ("dsw", "dlc"):
        raise bad(f"ENV must be dsw or dlc, got {a['ENV']!r}")
    imp = Imported(
        "pai-ds-llama", {"name": name or f"pai-ds-llama-{a['MODEL_SIZE']}".lower(), "kind": "hf-deepspeed"}
    )
    imp.mapped.append(("run_ds_train_huggingface_llama.sh", "kind: hf-deepspeed"))
    if world_size:
        world, why = world_size, f"--world-size {world_size}"
    elif a["ENV"] == "dsw":
        world, why = DSW_GPUS, "dsw: the script's 8 GPUs of one node"
    else:
        raise bad("ENV=dlc takes the world size from the cluster: pass --world-size (ranks in all)")
    imp.mapped.append((f"ENV={a['ENV']}", f"{world} ranks ({why}); the cluster is Ray's"))
    _common(
        imp,
        mbs=flag_num("BATCH_SIZE", a["BATCH_SIZE"]),
        ga=flag_num("GA_STEPS", a["GA_STEPS"]),
        world=world,
        lr=a["LR"],
        seq=flag_num("SEQ_LEN", a["SEQ_LEN"]),
        epochs=flag_num("EPOCH", a["EPOCH"]),
    )
    imp.mapped.append(
        (f"MODEL_SIZE={a['MODEL_SIZE']}", "the architecture is read from PRETRAIN_CHECKPOINT_PATH")
    )
    _precision(imp, a["PR"], f"PR={a['PR']}")
    zero = flag_num("ZERO", a["ZERO"])
    if zero not in (1, 2, 3):
        raise bad(f"ZERO must be 1, 2 or 3, got {zero}")
    imp.set("deepspeed.zero_stage", zero, f"ZERO={zero}")
    imp.set("training.recompute", "full" if flag_bool("GC", a["GC"]) else "none", f"GC={a['GC']}")
    if "FLASH" in a:
        imp.no_effect.append(
            (f"FLASH={a['FLASH']}", "attention runs through PyTorch SDPA, which picks flash kernels on GPUs")
        )
    _data(imp, "data.files", a["TRAIN_DATASET_PATH"], f"TRAIN_DATASET_PATH={a['TRAIN_DATASET_PATH']}")
    _data(imp, "data.valid_files", a["VALID_DATASET_PATH"], f"VALID_DATASET_PATH={a['VALID_DATASET_PATH']}")
    imp.set(
        "model.hf_model",
        a["PRETRAIN_CHECKPOINT_PATH"],
        f"PRETRAIN_CHECKPOINT_PATH={a['PRETRAIN_CHECKPOINT_PATH']}",
    )
    out = Path(a["OUTPUT_BASEPATH"])
    imp.set("checkpoint.save_dir", str(out / "checkpoint" / imp.doc["name"]), f"OUTPUT_BASEPATH={out}")
    imp.set(
        "checkpoint.export_hf_dir",
        str(out / "hf" / imp.doc["name"]),
        "the hand conversion to HF the guide does after training",
    )
    imp.set("resources.gpus_per_worker", 1, "one GPU per rank (torchrun --nproc_per_node = GPUs)")
    return imp


def import_pai_ds_flags(tokens: list[str], *, name: str = "", world_size: int = 0) -> Imported:
    """The flag form: what the script passes to ``ds_train_huggingface_llama.py`` (and ``--zero-stage``)."""
    script = next((i for i, t in enumerate(tokens) if t.endswith(".py")), -1)
    launcher, flags = _flags(tokens[:script] if script >= 0 else []), _flags(tokens[script + 1 :])
    imp = Imported("pai-ds-flags", {"name": name or "pai-ds", "kind": "hf-deepspeed"})
    nproc = one("nproc_per_node", launcher.pop("nproc_per_node", launcher.pop("nproc-per-node", ["1"])), int)
    nnodes = one("nnodes", launcher.pop("nnodes", ["1"]), int)
    for f, values in launcher.items():
        imp.no_effect.append((f"torchrun --{f} {' '.join(values)}".strip(), "Ray places the ranks"))
    told = world_size or nproc * nnodes > 1
    world_size = world_size or nproc * nnodes
    need = (
        "load",
        "save",
        "train-data",
        "micro-batch-size",
        "gradient-accumulation-steps",
        "lr",
        "seq-length",
        "epochs",
    )
    missing = [f"--{f}" for f in need if f not in flags]
    if missing:
        raise bad(f"ds_train_huggingface_llama.py needs {', '.join(missing)}")
    world = world_size or 1
    _common(
        imp,
        mbs=one("micro-batch-size", flags.pop("micro-batch-size"), int),
        ga=one("gradient-accumulation-steps", flags.pop("gradient-accumulation-steps"), int),
        world=world,
        lr=one("lr", flags.pop("lr")),
        seq=one("seq-length", flags.pop("seq-length"), int),
        epochs=one("epochs", flags.pop("epochs"), int),
    )
    if not told:
        imp.no_effect.append(
            ("world size", "not in the flags (torchrun's --nproc_per_node): 1 rank; pass --world-size")
        )
    load = one("load", flags.pop("load"))
    imp.set("model.hf_model", load, f"--load {load}")
    save = one("save", flags.pop("save"))
    imp.set("checkpoint.save_dir", save, f"--save {save}")
    _data(imp, "data.files", one("train-data", flags.pop("train-data")), "--train-data")
    if "valid-data" in flags:
        _data(imp, "data.valid_files", one("valid-data", flags.pop("valid-data")), "--valid-data")
    for pr in ("bf16", "fp16"):
        if pr in flags:
            if flags.pop(pr):
                raise bad(f"--{pr} takes no value")
            _precision(imp, pr, f"--{pr}")
    if "enable-gradient-checkpointing" in flags:
        flags.pop("enable-gradient-checkpointing")
        imp.set("training.recompute", "full", "--enable-gradient-checkpointing")
    if "zero-stage" in flags:
        imp.set("deepspeed.zero_stage", one("zero-stage", flags.pop("zero-stage"), int), "--zero-stage")
    else:
        imp.no_effect.append(
            ("ZeRO stage", "not a flag (ds_config.json holds it): deepspeed.zero_stage 0 unless --zero-stage")
        )
    for f in ARCH_FLAGS:
        if f in flags:
            imp.no_effect.append(
                (f"--{f} {' '.join(flags.pop(f))}", "the architecture is read from --load's config.json")
            )
    for f, why in (
        ("num-workers", "records are tokenized in each rank, no loader workers"),
        ("logging-dir", "TensorBoard logs go to <save_dir>/tensorboard"),
        ("flash", "attention runs through PyTorch SDPA, which picks flash kernels on GPUs"),
    ):
        if f in flags:
            imp.no_effect.append((f"--{f} {' '.join(flags.pop(f))}", why))
    for f, values in flags.items():
        imp.unmapped.append(
            (
                f"--{f} {' '.join(values)}".strip(),
                "not a flag of ds_train_huggingface_llama.py megastack knows",
            )
        )
    imp.set("resources.gpus_per_worker", 1, "one GPU per rank (the script runs on GPUs)")
    return imp
