"""Turn existing Megatron / Pai-Megatron-Patch command lines into a TrainJobSpec document.

Three layouts:
- ``megatron``: a ``pretrain_gpt.py`` flag list (Megatron-LM's ``examples/gpt3/train_gpt2_345m_*.sh``),
  optionally with the ``torchrun`` launcher arguments in front (they give the world size);
- ``pai-qwen2.5``: the 25 positional arguments of Pai-Megatron-Patch ``examples/qwen2_5/run_mcore_qwen.sh``;
- ``pai-qwen3``: the 27 of ``examples/qwen3/run_mcore_qwen3.sh`` (dense and MoE sizes, with ETP and EP);
- ``pai-llama2``: the 24 positional arguments of ``examples/llama2/run_pretrain_megatron_llama.sh``;
- ``pai-ds-llama``: the 14 (or 15) positional arguments of ``run_ds_train_huggingface_llama.sh``, Pai's
  HF + DeepSpeed flow (an ``hf-deepspeed`` spec), and ``pai-ds-flags``: the flags that script hands
  ``ds_train_huggingface_llama.py`` (``tools/cli/import_pai_ds.py``).

Every input item ends in exactly one of three lists: mapped (where it went in the spec), no effect in
megastack (with the reason), or not mapped (megastack cannot honour it). Nothing is dropped silently;
the caller refuses to write a spec with unmapped items unless told to.
"""

from __future__ import annotations

import json
import re

from shared.errors import InvalidArgument
from tools.cli.import_common import Imported, bad
from tools.cli.import_megatron import import_megatron
from tools.cli.import_pai import LLAMA2_ARGS, QWEN3_ARGS, QWEN25_ARGS, import_pai
from tools.cli.import_pai_ds import (
    DS_ARGS_14,
    DS_ARGS_15,
    import_pai_ds,
    import_pai_ds_flags,
    is_pai_ds_flags,
)

FORMATS = ("auto", "megatron", "pai-qwen2.5", "pai-qwen3", "pai-llama2", "pai-ds-llama", "pai-ds-flags")


def detect(tokens: list[str]) -> str:
    if is_pai_ds_flags(tokens):
        return "pai-ds-flags"
    if any(t.startswith("--") for t in tokens):
        return "megatron"
    if tokens and tokens[0] in ("dsw", "dlc"):
        if len(tokens) == len(QWEN25_ARGS):
            return "pai-qwen2.5"
        if len(tokens) == len(QWEN3_ARGS):
            return "pai-qwen3"
        if len(tokens) == len(LLAMA2_ARGS):
            return "pai-llama2"
        if len(tokens) in (len(DS_ARGS_14), len(DS_ARGS_15)):
            return "pai-ds-llama"
    raise bad(
        f"cannot tell the layout of {len(tokens)} arguments: a Megatron flag list has --flags; Pai's "
        "run_mcore_qwen.sh "
        f"takes {len(QWEN25_ARGS)} positional arguments, run_mcore_qwen3.sh {len(QWEN3_ARGS)}, "
        "run_pretrain_megatron_llama.sh "
        f"{len(LLAMA2_ARGS)}, run_ds_train_huggingface_llama.sh {len(DS_ARGS_14)} or {len(DS_ARGS_15)}, "
        "all starting with dsw or dlc (or pass --format)"
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
    rank); 0 runs the ranks on CPU (gloo), as on a laptop."""
    tokens = [t for t in tokens if t not in ("\\", "")]
    if fmt not in FORMATS:
        raise bad(f"format must be one of {', '.join(FORMATS)}")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise InvalidArgument("--gpus-per-worker must be >= 0", field="gpus_per_worker")
    layout = detect(tokens) if fmt == "auto" else fmt
    if layout == "megatron":
        imp = import_megatron(tokens, name=name, world_size=world_size)
        if tokenizer:
            imp.set("model.tokenizer", tokenizer, f"tokenizer {tokenizer}")
    elif layout == "pai-ds-llama":
        imp = import_pai_ds(tokens, name=name, world_size=world_size)
    elif layout == "pai-ds-flags":
        imp = import_pai_ds_flags(tokens, name=name, world_size=world_size)
    else:
        imp = import_pai(tokens, layout, name=name, world_size=world_size, tokenizer=tokenizer)
    if tokenizer and layout.startswith("pai-ds"):
        imp.set("model.tokenizer", tokenizer, f"tokenizer {tokenizer}")
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
    order = ["name", "kind", "model", "data", "parallel", "optimizer", "training", "checkpoint", "deepspeed"]
    order.append("resources")
    doc = {k: doc[k] for k in order if k in doc} | {k: v for k, v in doc.items() if k not in order}
    head = [f"# imported by `megastack train import-args` from a {imp.source} command line"]
    if imp.no_effect:
        head.append("# accepted, no effect in megastack:")
        head += [f"#   {item}: {why}" for item, why in imp.no_effect]
    if imp.unmapped:
        head.append("# NOT mapped (megastack cannot honour these; review before training):")
        head += [f"#   {item}: {why}" for item, why in imp.unmapped]
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False)
