"""Hugging Face checkpoint folders: lazy reading (tensor by tensor) and streaming writing."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from llm.checkpoints.safetensors_io import SafetensorsFile, write_safetensors
from llm.models.base import ArchConfig, ModelFamily
from llm.models.registry import arch_from_hf_config, family
from shared.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)


def is_hf_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds an HF model (its config.json)."""
    return (Path(path) / "config.json").is_file()


class HFCheckpoint:
    """A transformers folder: ``config.json`` plus safetensors (single, sharded) or ``pytorch_model.bin``.

    Tensors are read lazily; nothing but the headers is loaded until :meth:`get` is called.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise NotFound(f"checkpoint folder {self.path} does not exist", field="load_dir")
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise InvalidArgument(f"{self.path} is not an HF checkpoint: no config.json", field="load_dir")
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{cfg_path}: not valid JSON ({e})", field="load_dir") from None
        self.arch: ArchConfig = arch_from_hf_config(self.config, str(cfg_path))
        self.family: ModelFamily = family(self.arch.family)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._torch_state: dict[str, torch.Tensor] | None = None
        self._index_files()

    def _index_files(self) -> None:
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            for f in files:
                handle = self._open(f)
                for name in handle.keys():
                    self._where[name] = f
            return
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        if not bins:
            raise InvalidArgument(
                f"{self.path}: no *.safetensors or pytorch_model.bin weights", field="load_dir"
            )
        state: dict[str, torch.Tensor] = {}
        for f in bins:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - a pickle that is not plain weights
                raise InvalidArgument(
                    f"{f}: cannot load as weights ({type(e).__name__}: {e})", field="load_dir"
                ) from None
            if not isinstance(part, dict):
                raise InvalidArgument(
                    f"{f}: expected a state dict, got {type(part).__name__}", field="load_dir"
                )
            state.update(part)
        self._torch_state = state

    def _open(self, f: Path) -> Any:
        if f not in self._handles:
            try:
                self._handles[f] = SafetensorsFile(f)
            except Exception as e:  # noqa: BLE001 - truncated or corrupt file
                raise InvalidArgument(
                    f"{f}: not a readable safetensors file ({e})", field="load_dir"
                ) from None
        return self._handles[f]

    def names(self) -> set[str]:
        """The HF tensor names stored in the checkpoint."""
        return set(self._torch_state) if self._torch_state is not None else set(self._where)

    def get(self, name: str) -> torch.Tensor:
        """One HF tensor, read from its shard (400 naming load_dir when it is missing)."""
        if self._torch_state is not None:
            if name not in self._torch_state:
                raise InvalidArgument(f"{self.path}: tensor {name} is missing", field="load_dir")
            return self._torch_state[name]
        f = self._where.get(name)
        if f is None:
            raise InvalidArgument(f"{self.path}: tensor {name} is missing", field="load_dir")
        try:
            return self._open(f).get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise InvalidArgument(f"{f}: cannot read tensor {name} ({e})", field="load_dir") from None

    def canonical_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights in Megatron canonical layout, produced one at a time."""
        missing = [n for n in self.family.hf_tensor_names(self.arch) if n not in self.names()]
        if missing:
            raise InvalidArgument(
                f"{self.path}: {len(missing)} tensors missing for {self.arch.architecture}, first: "
                f"{missing[0]}",
                field="load_dir",
            )
        yield from self.family.hf_to_megatron(self.arch, self.get)

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer files present beside the weights."""
        return [self.path / f for f in TOKENIZER_FILES if (self.path / f).is_file()]

    def total_bytes(self) -> int:
        """Bytes of the weight files on disk."""
        return sum(f.stat().st_size for f in set(self._where.values())) if self._where else 0


def write_hf_checkpoint(
    out_dir: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    config: dict[str, Any],
    dtype: torch.dtype | None = None,
    extra_files: Iterable[Path] = (),
) -> int:
    """Write config.json, model.safetensors (streamed) and copies of ``extra_files``; returns bytes
    written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        cfg["dtype"] = cfg["torch_dtype"]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    def cast() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in tensors:
            yield name, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    size = write_safetensors(out_dir / "model.safetensors", cast())
    for f in extra_files:
        target = out_dir / Path(f).name
        if not target.exists():
            target.write_bytes(Path(f).read_bytes())
    return size
