"""One conversion: read any checkpoint as canonical tensors, optionally merge LoRA, write the target.

Everything streams: the reader hands out one tensor (at most one layer) at a time, the HF and
torch_dist writers put each tensor on disk before the next is read. The output appears only at the
end, in one rename (``shared.atomic``); a failure or cancel leaves nothing at the target.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm.checkpoints import CheckpointReader, detect_format, open_checkpoint
from llm.checkpoints import layout as L
from llm.checkpoints.hf import TOKENIZER_FILES, write_hf_checkpoint
from llm.checkpoints.megatron import legacy_rank_dir
from llm.devices import dtype_name, resolve_dtype
from llm.mcore.model import padded_vocab_size
from llm.models.base import MappedView, expert_prefix, megatron_names
from services.converter.writers import TorchDistWriter, megatron_args, write_megatron_extras
from shared.atomic import atomic_dir, check_target
from shared.errors import InvalidArgument
from shared.text import aligned

logger = logging.getLogger(__name__)
FORMATS = ("hf", "mcore", "legacy")  # what the converter writes
SOURCE_FORMATS = (
    *FORMATS,
    "deepspeed",
)  # what it reads: also DeepSpeed save folders (llm.checkpoints.deepspeed)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ConvertSpec:
    load_dir: Path
    save_dir: Path
    target_format: str
    source_format: str | None = None  # None: detect
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallel (legacy targets: mp_rank_TT[_PPP]_EEE folders; torch_dist is layout-free)
    num_layer_list: tuple[int, ...] = ()
    layers_per_virtual_stage: int = 0
    params_dtype: str | None = None  # None: keep the source dtype
    divisible_by: int = 128
    lora_dir: Path | None = None
    verify: bool = False
    overwrite: bool = False
    iteration: int = 0  # Megatron targets: 0 = "release"
    load_iteration: int | None = None  # Megatron sources: this iteration instead of the newest
    expect: tuple[tuple[str, Any], ...] = ()  # (EXPECTABLE name, value) the caller says the source has


@dataclass
class ConvertResult:
    save_dir: str
    num_tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    parity: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(spec: ConvertSpec) -> list[Path]:
    """What the conversion reads. One iteration of a save folder reads that iteration's folder and the
    folder's own files (tracker, megastack.json, tokenizer/), so a target beside it in the same save folder
    (the trainer's per-checkpoint exports) is allowed, and one that would replace the save folder is not."""
    lora = [Path(spec.lora_dir)] if spec.lora_dir is not None else []
    load = Path(spec.load_dir)
    if spec.load_iteration is None:
        return [load, *lora]
    from llm.checkpoints.megatron import META_FILE, TOKENIZER_DIR, TRACKER

    return [
        load / f"iter_{spec.load_iteration:07d}",
        load / META_FILE,
        load / TOKENIZER_DIR,
        load / TRACKER,
        *lora,
    ]


# What a caller may state about the source (Megatron's argument names): read from the checkpoint anyway, so a
# stated value is only checked, and a mismatch refused naming both (users of Megatron's and Pai's converters
# repeat the source's layout and architecture in flags; a wrong one must not pass silently).
LAYOUT_FACTS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")
ARCH_FACTS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "family",
)
EXPECTABLE = LAYOUT_FACTS + ARCH_FACTS


def source_facts(reader: CheckpointReader) -> dict[str, tuple[Any, str]]:
    """Each EXPECTABLE name: (what the checkpoint has, where that comes from); None where the checkpoint does
    not fix it (a torch_dist checkpoint loads at any TP and PP)."""
    arch = reader.arch
    if reader.format in ("hf", "deepspeed"):
        where = "its config.json" if reader.format == "hf" else "its hf_model/config.json"
        tp = pp = ep = (
            1,
            "an HF checkpoint is not split" if reader.format == "hf" else "ZeRO shards are joined",
        )
    else:
        where = (
            "its megastack.json" if getattr(reader, "meta", None) else "the Megatron arguments saved in it"
        )
        lay = reader.parallel_layout()
        tp = (lay["tensor_parallel"], "its mp_rank_* folders")
        pp = (lay["pipeline_parallel"], "its mp_rank_* folders")
        ep = (lay["expert_parallel"], "its mp_rank_* folders and saved arguments")
    return dict(zip(LAYOUT_FACTS, (tp, pp, ep))) | {name: (getattr(arch, name), where) for name in ARCH_FACTS}


def check_expectations(reader: CheckpointReader, expect: tuple[tuple[str, Any], ...], load: Path) -> None:
    """400 naming both values where a stated fact of the source differs from the checkpoint's."""
    facts = source_facts(reader)
    for name, want in expect:
        if name not in facts:
            raise InvalidArgument(
                f"source.{name}: not something a source is checked for; use one of {', '.join(EXPECTABLE)}",
                field="source",
            )
        got, where = facts[name]
        if got is not None and got != want:
            raise InvalidArgument(
                f"the source was said to have {name} {want}, but {load} has {name} {got} (from {where}); "
                "leave the flag out: the converter reads it from the checkpoint",
                field=f"source.{name}",
            )


def validate(spec: ConvertSpec) -> CheckpointReader:
    """Every check that can fail before anything is written; returns the opened source."""
    if spec.target_format not in FORMATS:
        raise InvalidArgument(
            f"target format must be one of {', '.join(FORMATS)}, got {spec.target_format!r}",
            field="target_format",
        )
    if spec.source_format is not None and spec.source_format not in SOURCE_FORMATS:
        raise InvalidArgument(
            f"source format must be one of {', '.join(SOURCE_FORMATS)}", field="source_format"
        )
    load = Path(spec.load_dir).absolute()
    check_target(Path(spec.save_dir), inputs=_inputs(spec), overwrite=spec.overwrite)
    detected = detect_format(load)
    if spec.source_format is not None and spec.source_format != detected:
        raise InvalidArgument(
            f"{load} is a {detected} checkpoint, not {spec.source_format}", field="source_format"
        )
    reader = open_checkpoint(load, detected, spec.load_iteration)
    check_expectations(reader, spec.expect, load)
    if spec.target_format == "hf" and (
        spec.tp != 1 or spec.pp != 1 or spec.num_layer_list or spec.layers_per_virtual_stage
    ):
        raise InvalidArgument(
            "HF checkpoints are not split: use TP=1, PP=1 for an hf target",
            field="target_tensor_parallel_size",
        )
    L.check_tp(reader.arch, spec.tp)
    L.check_ep(reader.arch, spec.ep)
    if spec.target_format == "hf" and spec.ep != 1:
        raise InvalidArgument(
            "HF checkpoints are not split: use EP=1 for an hf target", field="target_expert_parallel_size"
        )
    L.PipelineLayout.build(
        reader.arch.num_layers,
        spec.pp,
        num_layer_list=list(spec.num_layer_list) or None,
        layers_per_virtual_stage=spec.layers_per_virtual_stage,
    )
    if spec.params_dtype is not None:
        try:
            resolve_dtype(spec.params_dtype)
        except ValueError as e:
            raise InvalidArgument(str(e), field="params_dtype") from None
    if spec.divisible_by < 1:
        raise InvalidArgument(
            "make_vocab_size_divisible_by must be >= 1", field="make_vocab_size_divisible_by"
        )
    if spec.lora_dir is not None:
        from services.converter.lora import check_adapter

        check_adapter(
            spec.lora_dir
        )  # refuses a folder that is not a PEFT LoRA adapter; its weights are read once, in convert
    return reader


def _tokenizer_files(reader: CheckpointReader) -> list[Path]:
    d = reader.tokenizer_dir()
    return [d / f for f in TOKENIZER_FILES if d is not None and (d / f).is_file()]


def _source_getter(reader: CheckpointReader, spec: ConvertSpec) -> Callable[[str], torch.Tensor]:
    if spec.lora_dir is None:
        return reader.get
    from services.converter.lora import LoraAdapter, merged_canonical_getter

    return merged_canonical_getter(reader, LoraAdapter(spec.lora_dir))


def convert(spec: ConvertSpec, progress: Progress = lambda done, total, msg: None) -> ConvertResult:
    t0 = time.perf_counter()
    reader = validate(spec)
    arch = reader.arch
    get = _source_getter(reader, spec)
    dtype = (
        resolve_dtype(spec.params_dtype)
        if spec.params_dtype
        else reader.get("decoder.final_layernorm.weight").dtype
    )
    result = ConvertResult(save_dir=str(Path(spec.save_dir).absolute()))
    logger.info(
        "converting %s (%s, %s) -> %s (%s, TP=%d PP=%d, %s)",
        spec.load_dir,
        reader.format,
        arch.architecture,
        spec.save_dir,
        spec.target_format,
        spec.tp,
        spec.pp,
        dtype_name(dtype),
    )
    with atomic_dir(Path(spec.save_dir), overwrite=spec.overwrite, inputs=_inputs(spec)) as tmp:
        if spec.target_format == "hf":
            result.num_tensors, result.bytes_written = _write_hf(reader, get, tmp, dtype, progress)
        elif spec.target_format == "mcore":
            result.num_tensors, result.bytes_written = _write_mcore(reader, get, tmp, dtype, spec, progress)
        else:
            result.num_tensors, result.bytes_written = _write_legacy(reader, get, tmp, dtype, spec, progress)
        result.seconds = time.perf_counter() - t0
        result.peak_rss_bytes = peak_rss_bytes()  # of the conversion itself, before verification loads models
        if spec.verify:  # on the finished files, before they appear at the target
            from services.converter.verify import parity

            progress(
                result.num_tensors, result.num_tensors, "verifying: running both models on the same tokens"
            )
            result.parity = parity(spec, reader, tmp, dtype)
    result.summary = summary(spec, reader, result, dtype)
    return result


def _counted(
    items: Iterator[tuple[str, torch.Tensor]], total: int, progress: Progress, verb: str
) -> Iterator[tuple[str, torch.Tensor]]:
    for i, (name, t) in enumerate(items, 1):
        yield name, t
        progress(i, total, f"{verb} {name}")


def _write_hf(
    reader: CheckpointReader, get, out: Path, dtype: torch.dtype, progress: Progress
) -> tuple[int, int]:
    arch, fam = reader.arch, reader.family
    view = MappedView(fam, arch, get, to="hf")
    names = fam.hf_tensor_names(arch)
    config = {**reader.hf_config, "vocab_size": arch.vocab_size}
    tensors = _counted(((n, view.get(n)) for n in names), len(names), progress, "wrote")
    size = write_hf_checkpoint(out, tensors, config=config, dtype=dtype, extra_files=_tokenizer_files(reader))
    return len(names), size


def _meta(
    reader: CheckpointReader,
    spec: ConvertSpec,
    fmt: str,
    dtype: torch.dtype,
    padded: int,
    layout: L.PipelineLayout | None,
) -> dict[str, Any]:
    return {
        "format": fmt,
        "created_by": "megastack",
        "created_unix_s": time.time(),
        "source": str(Path(spec.load_dir).absolute()),
        "arch": reader.arch.to_dict(),
        "hf_config": {**reader.hf_config, "vocab_size": reader.arch.vocab_size},
        "padded_vocab_size": padded,
        "make_vocab_size_divisible_by": spec.divisible_by,
        "tensor_parallel": spec.tp,
        "pipeline_parallel": spec.pp,
        "expert_parallel": spec.ep,
        "params_dtype": dtype_name(dtype),
        "layers_per_stage": [list(c) for c in layout.counts] if layout else None,
        "iteration": spec.iteration or "release",
        "lora": str(spec.lora_dir) if spec.lora_dir else None,
    }


def _iteration_name(spec: ConvertSpec) -> str:
    return f"iter_{spec.iteration:07d}" if spec.iteration else "release"


def _write_mcore(reader, get, out: Path, dtype, spec: ConvertSpec, progress: Progress) -> tuple[int, int]:
    arch = reader.arch
    padded = padded_vocab_size(arch.vocab_size, spec.divisible_by, spec.tp)
    names = reader.names()
    writer = TorchDistWriter(out / _iteration_name(spec), arch)
    try:
        for i, name in enumerate(names, 1):
            t = get(name)
            if name in L.VOCAB_TENSORS:
                t = L.pad_vocab(t, padded)
            writer.add(name, t.to(dtype))
            progress(i, len(names), f"wrote {name}")
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    write_megatron_extras(
        out,
        iteration=spec.iteration,
        meta=_meta(reader, spec, "mcore", dtype, padded, None),
        tokenizer_files=_tokenizer_files(reader),
    )
    return len(names), writer.bytes_written


def _write_legacy(reader, get, out: Path, dtype, spec: ConvertSpec, progress: Progress) -> tuple[int, int]:
    arch, tp, pp = reader.arch, spec.tp, spec.pp
    layout = L.PipelineLayout.build(
        arch.num_layers,
        pp,
        num_layer_list=list(spec.num_layer_list) or None,
        layers_per_virtual_stage=spec.layers_per_virtual_stage,
    )
    padded = padded_vocab_size(arch.vocab_size, spec.divisible_by, tp)
    args = megatron_args(
        arch,
        tp=tp,
        pp=pp,
        padded_vocab=padded,
        divisible_by=spec.divisible_by,
        dtype=dtype,
        layout=layout,
        iteration=spec.iteration,
        ep=spec.ep,
    )
    chunks = layout.chunks()
    ep = spec.ep
    names = reader.names()
    experts = sum(1 for n in names if L.expert_of(n.split(".", 3)[-1]) is not None)
    total = tp * (ep * (len(names) - experts) + experts)  # each EP rank repeats what is not an expert
    done, size, n_written = 0, 0, 0
    it_dir = out / _iteration_name(spec)
    per_rank = arch.num_experts // ep if arch.moe else 0

    def tensor(name: str, rank: int) -> torch.Tensor:
        t = get(name)
        if name in L.VOCAB_TENSORS:
            t = L.pad_vocab(t, padded)
        return L.shard(name, t, tp=tp, rank=rank, gated=arch.gated).to(dtype).clone()

    def layer_entries(layer: int, local: int, e: int) -> Iterator[tuple[str, str]]:
        """(stored name, canonical name) of one layer in EP rank ``e``: its own experts, numbered from 0."""
        for name in megatron_names(arch, layer):
            sub = name.split(".", 3)[3]
            expert = L.expert_of(sub)
            if expert is not None:
                j, rest = expert
                if j // per_rank != e:
                    continue
                sub = f"{expert_prefix(j % per_rank)}{rest}"
            yield f"decoder.layers.{local}.{L.to_local(sub)}", name

    modules = L.linear_modules(arch, num_experts=per_rank)
    for p in range(pp):
        for r in range(tp):
            for e in range(ep):
                models: dict[str, dict[str, Any]] = {}
                for stage, v, first, count in chunks:
                    if stage != p:
                        continue
                    sd: dict[str, Any] = {}
                    if p == 0 and v == 0:
                        for name in megatron_names(arch, None):
                            if name.startswith("embedding."):
                                sd[name] = tensor(name, r)
                    for local in range(count):
                        for stored, name in layer_entries(first + local, local, e):
                            sd[stored] = tensor(name, r)
                        for module in modules:
                            sd[f"decoder.layers.{local}.{module}._extra_state"] = None
                    if p == pp - 1 and v == layout.vpp - 1:
                        for name in megatron_names(arch, None):
                            if name.startswith("decoder.final_layernorm"):
                                sd[name] = tensor(name, r)
                        if not arch.tie_word_embeddings:
                            sd["output_layer.weight"] = tensor("output_layer.weight", r)
                        elif pp > 1:  # a tied head on a later stage keeps its own copy of the embedding
                            sd["output_layer.weight"] = tensor("embedding.word_embeddings.weight", r)
                        sd["output_layer._extra_state"] = None
                    n = sum(1 for value in sd.values() if value is not None)
                    done += n
                    n_written += n
                    where = f"stage {p} rank {r}" + (f" expert rank {e}" if ep > 1 else "") + f" chunk {v}"
                    progress(min(done, total), total, where)
                    models["model" if layout.vpp == 1 else f"model{v}"] = sd
                path = it_dir / legacy_rank_dir(r, p, pp, e, ep) / "model_optim_rng.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {
                        "args": args,
                        "checkpoint_version": 3.0,
                        "iteration": spec.iteration,
                        **models,
                        "num_floating_point_operations_so_far": 0,
                    },
                    path,
                )
                size += path.stat().st_size
                del models
    write_megatron_extras(
        out,
        iteration=spec.iteration,
        meta=_meta(reader, spec, "legacy", dtype, padded, layout),
        tokenizer_files=_tokenizer_files(reader),
    )
    return n_written, size


def summary(spec: ConvertSpec, reader: CheckpointReader, r: ConvertResult, dtype: torch.dtype) -> str:
    rows = [
        (
            "source",
            f"{spec.load_dir} ({reader.format}, {reader.arch.architecture}, "
            f"{reader.arch.num_parameters() / 1e6:.1f}M params)",
        ),
        (
            "target",
            f"{spec.save_dir} ({spec.target_format}, TP={spec.tp} PP={spec.pp}"
            + (f" EP={spec.ep}" if spec.ep > 1 else "")
            + f", {dtype_name(dtype)})",
        ),
        ("tensors", str(r.num_tensors)),
        ("bytes written", f"{r.bytes_written / 1e6:.1f} MB"),
        ("time", f"{r.seconds:.2f} s"),
        ("peak RSS", f"{r.peak_rss_bytes / 1e6:.0f} MB"),
    ]
    if spec.lora_dir:
        rows.append(("LoRA merged", str(spec.lora_dir)))
    if r.parity:
        p = r.parity
        rows.append(
            ("logits max |diff|", f"{p['max_abs_logit_diff']:.3g} (mean {p['mean_abs_logit_diff']:.3g})")
        )
        rows.append(
            ("top-1 agreement", f"{100 * p['top1_agreement']:.2f}% of {p['num_positions']} positions")
        )
        if p.get("weights_exact") is not None:
            rows.append(("weights exact", "yes" if p["weights_exact"] else "no"))
        if p.get("layers"):
            over = p["first_layer_over"] or ("not judged" if spec.lora_dir else "none")
            rows.append(("first layer over", f"{over} (tolerance {p['tolerance']:.0e}, relative)"))
            rows.append(("tolerance because", p["tolerance_reason"]))
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return text + ("\n\n" + layer_table(r.parity) if r.parity.get("layers") else "")


def layer_table(p: dict[str, Any]) -> str:
    """The per-layer parity of ``--verify``: max |diff| of the hidden states, their typical RMS, the
    relative difference (services/converter/verify.py layer_diffs)."""
    rows = [["hidden state", "max |diff|", "typical RMS", "relative diff", ""]]
    for d in p["layers"]:
        rel = d["relative_diff"]
        flag = "over" if p["tolerance"] and rel > p["tolerance"] else ""
        rows.append([d["name"], f"{d['max_abs_diff']:.3g}", f"{d['scale']:.3g}", f"{rel:.2e}", flag])
    return aligned(rows)
