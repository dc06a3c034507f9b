"""DeepSpeed checkpoints (``global_stepN/`` + ``latest``, any ZeRO stage) -> one fp32 state dict -> HF.

The consolidation is DeepSpeed's own (``deepspeed.utils.zero_to_fp32``) for ZeRO 1-3: it joins the
fp32 master partitions every rank saved. ZeRO stage 0 keeps no partitions: its full weights are the
``module`` of ``mp_rank_00_model_states.pt``. The HF side needs the model's config and tokenizer,
which megastack's trainer copies into the save folder (``hf_model/``) when a job starts.

DeepSpeed's files are pickles that DeepSpeed's loader unpickles in full. Before any of them is loaded,
:func:`check_pickles` lists the globals each one names without executing it (torch's
``get_unsafe_globals_in_checkpoint`` reads the opcodes) and refuses a file that names anything beyond
the three DeepSpeed classes its ZeRO optimizer states are made of: a folder from anywhere cannot run code
in the converter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from shared.errors import InvalidArgument

MODEL_INFO = "hf_model"
STEP_PREFIX = "global_step"
# what DeepSpeed 0.19's checkpoints name beyond tensors and containers (ZeRO 1-3 optimizer states, fp32 and
# bf16; loss scalers of fp16 runs): an enum, a dataclass and two plain classes
ALLOWED_GLOBALS = frozenset(
    {
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


def is_deepspeed_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a DeepSpeed save folder (a ``latest`` tag, or ``global_step*`` model states)."""
    return (Path(folder) / "latest").is_file() or any(Path(folder).glob("global_step*/*model_states.pt"))


def step_of(tag: str) -> int | None:
    """N of a ``global_stepN`` tag or folder name; None for anything else."""
    n = tag[len(STEP_PREFIX) :] if tag.startswith(STEP_PREFIX) else ""
    return int(n) if n.isdigit() else None


def step_folders(folder: Path) -> dict[int, Path]:
    """The ``global_stepN`` folders of a save folder, by N."""
    found = ((step_of(p.name), p) for p in Path(folder).glob(f"{STEP_PREFIX}*") if p.is_dir())
    return {n: p for n, p in found if n is not None}


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files (and generation config) present in ``hf_model/`` of a save folder."""
    from llm.checkpoints.hf import TOKENIZER_FILES

    info = Path(folder) / MODEL_INFO
    return [info / f for f in TOKENIZER_FILES if (info / f).is_file()]


def resolve_tag(folder: Path, tag: str | None = None) -> str:
    """``tag``, or the one ``latest`` names; InvalidArgument (load_dir) when there is no such folder."""
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


def check_pickles(folder: Path, tag: str) -> None:
    """InvalidArgument (load_dir) when a ``.pt`` file of the tag names a global outside ALLOWED_GLOBALS."""
    files = sorted((Path(folder) / tag).glob("*.pt"))
    if not files:
        raise InvalidArgument(f"{Path(folder) / tag} holds no DeepSpeed .pt files", field="load_dir")
    for f in files:
        try:
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        except Exception as e:  # noqa: BLE001 - truncated or not a torch file
            raise InvalidArgument(
                f"{f}: not a readable torch file ({type(e).__name__}: {e})", field="load_dir"
            ) from None
        if names - ALLOWED_GLOBALS:
            raise InvalidArgument(
                f"{f} names {', '.join(sorted(names - ALLOWED_GLOBALS))}, which a DeepSpeed checkpoint of "
                "model and optimizer states does not hold; megastack does not unpickle it",
                field="load_dir",
            )


def tag_of(iteration: int | None) -> str | None:
    """The DeepSpeed tag of a step (``--load-iteration N`` -> ``global_stepN``); None for the latest."""
    return None if iteration is None else f"{STEP_PREFIX}{iteration}"


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
    check_pickles(folder, tag)
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
    """The HF config saved beside the checkpoint (``hf_model/config.json``)."""
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
    extra = tokenizer_files(folder)
    with atomic_dir(Path(out_dir), overwrite=overwrite, inputs=[folder, *inputs]) as tmp:
        write_hf_checkpoint(tmp, tensors, config={**config, "torch_dtype": "float32"}, extra_files=extra)
    return Path(out_dir)


class DeepSpeedCheckpoint:
    """A DeepSpeed save folder seen as an HF checkpoint: the consolidated fp32 weights under their HF names,
    with the config and tokenizer of ``hf_model/`` (what ``llm.checkpoints.open_checkpoint`` reads)."""

    def __init__(self, path: Path | str, iteration: int | None = None) -> None:
        from llm.models.registry import arch_from_hf_config, family

        self.path = Path(path)
        self.tag = resolve_tag(self.path, tag_of(iteration))
        self.config = hf_config(self.path)
        self.arch = arch_from_hf_config(self.config, str(self.path / MODEL_INFO / "config.json"))
        self.family = family(self.arch.family)
        _, tensors = hf_tensors(self.path, self.tag)
        self._state = dict(tensors)

    def names(self) -> set[str]:
        """The HF tensor names of the consolidated weights."""
        return set(self._state)

    def get(self, name: str) -> torch.Tensor:
        """One HF tensor (fp32)."""
        if name not in self._state:
            raise InvalidArgument(f"{self.path}/{self.tag}: tensor {name} is missing", field="load_dir")
        return self._state[name]

    def canonical_tensors(self):
        """The weights in Megatron canonical layout (the family's mapping from the HF names)."""
        missing = [n for n in self.family.hf_tensor_names(self.arch) if n not in self._state]
        if missing:
            raise InvalidArgument(
                f"{self.path}/{self.tag}: {len(missing)} tensors missing for {self.arch.architecture}, "
                f"first: "
                f"{missing[0]}",
                field="load_dir",
            )
        yield from self.family.hf_to_megatron(self.arch, self.get)

    def tokenizer_dir(self) -> Path:
        """``hf_model/``: the tokenizer the trainer copied at the job's start."""
        return self.path / MODEL_INFO

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files present in ``hf_model/``."""
        return tokenizer_files(self.path)

    def hf_model(self):
        """The transformers model with these weights (what ``--verify`` runs on the source side)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(str(self.path / MODEL_INFO))
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(self._state, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise InvalidArgument(
                f"{self.path}/{self.tag}: weights do not fit {self.arch.architecture} "
                f"(missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})",
                field="load_dir",
            )
        if "lm_head.weight" in missing:
            model.tie_weights()
        return model.eval()
