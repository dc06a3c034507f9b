"""Checkpoint readers shared by the converter and textgen.

:func:`open_checkpoint` detects the layout of a folder and returns a reader whose
``canonical_tensors()`` yields the weights in the Megatron canonical layout (see ``llm.models``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from llm.models.base import ArchConfig
from shared.errors import InvalidArgument, NotFound


class CheckpointReader(Protocol):
    path: Path
    arch: ArchConfig
    format: str  # hf | mcore | legacy | deepspeed (a source only)
    hf_config: dict

    def names(self) -> list[str]:
        """Canonical tensor names: the globals, then layer by layer."""

    def get(self, name: str) -> torch.Tensor:
        """One canonical tensor, unsharded and unpadded."""

    def canonical_tensors(self):
        """(name, tensor) for every canonical tensor, in :meth:`names` order."""

    def tokenizer_dir(self) -> Path | None:
        """The tokenizer folder that travels with the checkpoint, or None."""


def detect_format(path: Path) -> str:
    """``hf``, ``deepspeed``, ``mcore`` or ``legacy``, from the files in ``path``; 404/400 naming load_dir
    otherwise."""
    from llm.checkpoints import megatron

    path = Path(path)
    if not path.exists():
        raise NotFound(f"checkpoint folder {path} does not exist", field="load_dir")
    if not path.is_dir():
        raise InvalidArgument(f"{path} is not a folder", field="load_dir")
    if (path / "config.json").is_file():
        return "hf"
    from llm.checkpoints.deepspeed import is_deepspeed_checkpoint

    if is_deepspeed_checkpoint(path):
        return "deepspeed"
    fmt = megatron.detect_megatron_format(path)
    if fmt is not None:
        return fmt
    raise InvalidArgument(
        f"{path} is not a checkpoint: no config.json (HF), no latest_checkpointed_iteration.txt, "
        "iter_*/release folder (Megatron), no latest file or global_step* folder (DeepSpeed)",
        field="load_dir",
    )


def open_checkpoint(
    path: Path | str, fmt: str | None = None, iteration: int | None = None
) -> CheckpointReader:
    """A :class:`CheckpointReader` over ``path`` in ``fmt`` (detected when None); ``iteration`` picks one
    iteration of a Megatron save folder instead of the newest."""
    from llm.checkpoints.hf import HFCheckpoint
    from llm.checkpoints.megatron import MegatronCheckpoint

    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == "hf":
        if iteration is not None:
            raise InvalidArgument(
                f"{path} is an HF checkpoint: it has no iterations to choose from", field="load_iteration"
            )
        return _HFReader(HFCheckpoint(path))
    if fmt == "deepspeed":
        from llm.checkpoints.deepspeed import DeepSpeedCheckpoint

        return _DeepSpeedReader(DeepSpeedCheckpoint(path, iteration))
    return MegatronCheckpoint(path, fmt, iteration)


class _HFReader:
    """An HF folder seen in the canonical layout (one layer mapped at a time)."""

    format = "hf"

    def __init__(self, ckpt) -> None:
        from llm.models.base import MappedView

        self.ckpt = ckpt
        self.path = ckpt.path
        self.arch = ckpt.arch
        self.family = ckpt.family
        self.hf_config = ckpt.config
        self._view = MappedView(ckpt.family, ckpt.arch, ckpt.get, to="megatron")

    def names(self) -> list[str]:
        from llm.models.base import megatron_names

        return megatron_names(self.arch, None) + [
            n for i in range(self.arch.num_layers) for n in megatron_names(self.arch, i)
        ]

    def get(self, name: str) -> torch.Tensor:
        return self._view.get(name)

    def canonical_tensors(self):
        return self.ckpt.canonical_tensors()

    def tokenizer_dir(self) -> Path | None:
        return self.path if self.ckpt.tokenizer_files() else None

    def dtype(self) -> torch.dtype:
        return self.ckpt.get(self.ckpt.family.hf_tensor_names(self.arch)[0]).dtype


class _DeepSpeedReader(_HFReader):
    """A DeepSpeed save folder, consolidated to fp32, read like an HF folder."""

    format = "deepspeed"

    def tokenizer_dir(self) -> Path | None:
        return self.ckpt.tokenizer_dir() if self.ckpt.tokenizer_files() else None

    def dtype(self) -> torch.dtype:
        return torch.float32
