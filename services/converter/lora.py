"""Merge a PEFT LoRA adapter into the base weights during conversion: W' = W + (alpha / r) * B @ A.

The adapter names HF modules (``base_model.model.<module>.lora_A.weight``), so the merge happens in HF
naming, one layer at a time, whatever the source format; ``use_rslora`` scales by alpha / sqrt(r), and
``fan_in_fan_out`` (GPT-2's Conv1D) transposes the update. Every adapter module must land on a base
tensor: an adapter that does not fit the model is refused, never silently half-applied.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from llm.models.base import MappedView
from shared.errors import InvalidArgument, NotFound

PREFIX = "base_model.model."


def check_adapter(path: Path | str) -> tuple[dict, Path]:
    """(adapter_config.json, the weights file) of a PEFT LoRA folder, without reading the weights: what the
    service checks at submit; the worker then reads the weights once (:class:`LoraAdapter`)."""
    path = Path(path)
    if not path.is_dir():
        raise NotFound(f"LoRA folder {path} does not exist", field="lora_load")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise InvalidArgument(f"{path}: no adapter_config.json (not a PEFT LoRA adapter)", field="lora_load")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{cfg_file}: not valid JSON ({e})", field="lora_load") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise InvalidArgument(
            f"{cfg_file}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r} is not LORA",
            field="lora_load",
        )
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise InvalidArgument(f"{cfg_file}: r must be a positive integer", field="lora_load")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return cfg, path / name
    raise InvalidArgument(f"{path}: no adapter_model.safetensors or adapter_model.bin", field="lora_load")


class LoraAdapter:
    """A PEFT LoRA adapter's A and B matrices, read once (in the conversion worker)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        cfg, weights = check_adapter(self.path)
        self.r = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", self.r))
        self.scale = alpha / math.sqrt(self.r) if cfg.get("use_rslora") else alpha / self.r
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            module = name.removeprefix(PREFIX)
            for tag, table in ((".lora_A.weight", self.a), (".lora_B.weight", self.b)):
                if module.endswith(tag):
                    table[module[: -len(tag)]] = t
        if not self.a or set(self.a) != set(self.b):
            raise InvalidArgument(f"{self.path}: LoRA A and B matrices do not pair up", field="lora_load")

    def delta(self, weight_name: str) -> torch.Tensor | None:
        """The update (alpha / r) B @ A of an HF weight, or None when the adapter does not touch it."""
        module = weight_name.removesuffix(".weight")
        if not weight_name.endswith(".weight") or module not in self.a:
            return None
        d = self.scale * (self.b[module].float() @ self.a[module].float())
        return d.t() if self.fan_in_fan_out else d


def merged_canonical_getter(reader, adapter: LoraAdapter) -> Callable[[str], torch.Tensor]:
    """A canonical-name getter whose weights include the adapter's updates."""
    fam, arch = reader.family, reader.arch
    names = set(fam.hf_tensor_names(arch))
    missing = [m for m in adapter.a if m + ".weight" not in names]
    if missing:
        raise InvalidArgument(
            f"{adapter.path}: LoRA module {missing[0]} matches no tensor of {arch.architecture}",
            field="lora_load",
        )
    hf_get = reader.ckpt.get if reader.format == "hf" else MappedView(fam, arch, reader.get, to="hf").get

    def merged(name: str) -> torch.Tensor:
        w = hf_get(name)
        d = adapter.delta(name)
        return w if d is None else (w.float() + d).to(w.dtype)

    return MappedView(fam, arch, merged, to="megatron").get
