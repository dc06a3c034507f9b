"""DeepSpeed checkpoints (``global_stepN/`` + ``latest``, any ZeRO stage) -> one fp32 state dict -> HF.

The consolidation is DeepSpeed's own (``deepspeed.utils.zero_to_fp32``) for ZeRO 1-3: it joins the
fp32 master partitions every rank saved. ZeRO stage 0 keeps no partitions: its full weights are the
``module`` of ``mp_rank_00_model_states.pt``. The HF side needs the model's config and tokenizer,
which megastack's trainer copies into the save folder (``hf_model/``) when a job starts.

DeepSpeed's files are pickles (``torch.load`` with full unpickling, as DeepSpeed itself loads them):
read only checkpoints you trust, like any DeepSpeed checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from shared.errors import InvalidArgument

MODEL_INFO = "hf_model"
TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
NOT_TOKENIZER = ("config.json", "generation_config.json", "megastack.json", "model.safetensors.index.json")


def is_deepspeed_checkpoint(folder: Path) -> bool:
    return (Path(folder) / "latest").is_file() or any(
        Path(folder).glob("global_step*/mp_rank_*_model_states.pt")
    )


def resolve_tag(folder: Path, tag: str | None = None) -> str:
    folder = Path(folder)
    if tag is None:
        try:
            tag = (folder / "latest").read_text().strip()
        except OSError:
            raise InvalidArgument(
                f"{folder} has no 'latest' file naming a DeepSpeed checkpoint tag", field="load_dir"
            ) from None
    if not (folder / tag).is_dir():
        raise InvalidArgument(f"{folder} has no checkpoint {tag!r}", field="load_dir")
    return tag


def zero_stage(folder: Path, tag: str) -> int:
    """0 when the tag holds no ZeRO optimizer partitions, else the stage the checkpoint records."""
    parts = sorted((Path(folder) / tag).glob("*zero_pp_rank_*optim_states.pt"))
    if not parts:
        return 0
    sd = torch.load(parts[0], map_location="cpu", weights_only=False)
    return int(sd["optimizer_state_dict"]["zero_stage"])


def fp32_state_dict(folder: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights, by the module's own parameter names."""
    folder = Path(folder)
    tag = resolve_tag(folder, tag)
    if zero_stage(folder, tag) == 0:
        files = sorted((folder / tag).glob("mp_rank_*_model_states.pt"))
        if len(files) != 1:
            raise InvalidArgument(
                f"{folder / tag}: a ZeRO-0 checkpoint holds one mp_rank_00_model_states.pt, not {len(files)}",
                field="load_dir",
            )
        module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag))


def hf_config(folder: Path) -> dict:
    path = Path(folder) / MODEL_INFO / "config.json"
    if not path.is_file():
        raise InvalidArgument(
            f"{folder} has no {MODEL_INFO}/config.json: megastack's trainer writes it; for another DeepSpeed "
            "checkpoint copy the HF model's config and tokenizer files there",
            field="load_dir",
        )
    return json.loads(path.read_text())


def hf_tensors(folder: Path, tag: str | None = None) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """(HF config, [(name, tensor)]) of a DeepSpeed checkpoint: the tied output layer is left out, as
    ``save_pretrained`` leaves it out."""
    config = hf_config(folder)
    sd = fp32_state_dict(folder, tag)
    if config.get("tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return config, sorted(sd.items())


def export_hf(
    folder: Path,
    out_dir: Path,
    *,
    tag: str | None = None,
    inputs: Iterable[Path] = (),
    overwrite: bool = True,
) -> Path:
    """Write the checkpoint as an HF folder (config, ``model.safetensors`` in fp32, tokenizer files),
    atomically; ``out_dir`` may be replaced only when megastack wrote it."""
    from llm.checkpoints.hf import write_hf_checkpoint
    from shared.atomic import atomic_dir

    folder = Path(folder)
    config, tensors = hf_tensors(folder, tag)
    extra = [
        f
        for f in sorted((folder / MODEL_INFO).iterdir())
        if f.is_file() and f.name not in NOT_TOKENIZER and f.name.endswith(TOKENIZER_SUFFIXES)
    ]
    generation = folder / MODEL_INFO / "generation_config.json"
    if generation.is_file():
        extra.append(generation)
    with atomic_dir(Path(out_dir), overwrite=overwrite, inputs=[folder, *inputs]) as tmp:
        write_hf_checkpoint(tmp, tensors, config={**config, "torch_dtype": "float32"}, extra_files=extra)
    return Path(out_dir)
