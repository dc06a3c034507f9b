"""Family registry keyed by the HF ``architectures`` name. Adding a family is one new file plus a line
here."""

from __future__ import annotations

from typing import Any

from llm.models.base import ArchConfig, ModelFamily
from llm.models.gpt2 import GPT2Family
from llm.models.llama import LlamaFamily
from llm.models.moe import MixtralFamily, Qwen2MoeFamily, Qwen3MoeFamily
from llm.models.qwen2 import Qwen2Family
from llm.models.qwen3 import Qwen3Family
from shared.errors import InvalidArgument

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        LlamaFamily(),
        Qwen2Family(),
        Qwen3Family(),
        GPT2Family(),
        MixtralFamily(),
        Qwen2MoeFamily(),
        Qwen3MoeFamily(),
    )
}
BY_ARCHITECTURE: dict[str, ModelFamily] = {a: f for f in FAMILIES.values() for a in f.hf_architectures}


def family_for_architecture(architecture: str) -> ModelFamily:
    """The family of an HF ``architectures[0]`` (400 listing the supported ones otherwise)."""
    try:
        return BY_ARCHITECTURE[architecture]
    except KeyError:
        supported = ", ".join(sorted(BY_ARCHITECTURE))
        raise InvalidArgument(
            f"unsupported architecture {architecture!r}; supported: {supported}", field="architectures"
        ) from None


def family(name: str) -> ModelFamily:
    """A family by name (llama, qwen2, qwen3, gpt2, mixtral, qwen2_moe, qwen3_moe); 400 otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise InvalidArgument(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def arch_from_hf_config(cfg: dict[str, Any], source: str = "config.json") -> ArchConfig:
    """The ArchConfig of an HF config.json, through its family."""
    archs = cfg.get("architectures") or []
    if not archs:
        raise InvalidArgument(
            f"{source}: no 'architectures' entry; cannot tell the model family", field="architectures"
        )
    return family_for_architecture(archs[0]).arch_from_hf_config(cfg)
