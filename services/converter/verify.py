"""Built-in parity check (--verify): run the source and the converted model on the same tokens.

Each side runs in the library its users would load it with: transformers for HF folders, and
megatron-core's GPTModel for Megatron checkpoints (torch_dist through ``dist_checkpointing.load``,
legacy single-file checkpoints through ``load_state_dict(strict=True)``, sharded ones merged by the
shared reader). Logits are compared on the real vocabulary in float32.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from llm.checkpoints import layout as L
from llm.checkpoints import open_checkpoint
from llm.devices import module_device, to_device
from llm.models.base import ArchConfig

logger = logging.getLogger(__name__)
SAMPLE = "The old man looked at the river and said that the bridge would not last another winter."


def sample_tokens(reader, arch: ArchConfig, length: int = 32) -> torch.Tensor:
    ids: list[int] = []
    tok_dir = reader.tokenizer_dir()
    if tok_dir is not None:
        from llm.tokenizers import Tokenizer

        ids = [i for i in Tokenizer.load(tok_dir).encode(SAMPLE * 3) if i < arch.vocab_size][:length]
    cpu = torch.device("cpu")  # the sample is drawn on the CPU (the same tokens on every machine), then moved
    if len(ids) < length:
        g = torch.Generator(device=cpu).manual_seed(0)
        ids = torch.randint(0, arch.vocab_size, (length,), generator=g, device=cpu).tolist()
    g = torch.Generator(device=cpu).manual_seed(1)
    second = torch.randint(0, arch.vocab_size, (length,), generator=g, device=cpu)
    return torch.stack([torch.tensor(ids, device=cpu), second])


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(to_device(tokens, module_device(model))).logits.float().cpu()


def megatron_logits(path: Path, fmt: str, tokens: torch.Tensor, iteration: int | None = None) -> torch.Tensor:
    from llm.mcore import dist as mdist
    from llm.mcore.model import (
        build_gpt_model,
        load_distributed,
        load_module_state,
        padded_vocab_size,
        transformer_config,
    )

    reader = open_checkpoint(path, fmt, iteration)
    arch = reader.arch
    mdist.init()
    padded = int(reader.meta.get("padded_vocab_size") or padded_vocab_size(arch.vocab_size))
    # legacy files hold the local spec's names; torch_dist keys load under either spec
    impl = "auto" if fmt == "mcore" else "local"
    model = build_gpt_model(arch, transformer_config(arch), vocab_size=padded, impl=impl).eval()
    legacy_single = (
        fmt == "legacy"
        and reader.parallel_layout()["tensor_parallel"] == 1
        and reader.parallel_layout()["pipeline_parallel"] == 1
    )
    if fmt == "mcore":
        state = load_distributed(model.sharded_state_dict(), reader.iter_dir)
        # a training checkpoint also carries optimizer, scheduler and step entries (common.pt): not weights
        wanted = model.state_dict().keys()
        load_module_state(model, {k: v for k, v in state.items() if k in wanted})
    elif legacy_single:
        from llm.checkpoints.megatron import load_weights_pickle

        sd = load_weights_pickle(reader.iter_dir / "mp_rank_00" / "model_optim_rng.pt")["model"]
        load_module_state(model, {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in sd.items()})
    else:
        sd = {}
        for name in reader.names():
            t = reader.get(name).float()
            if name in L.VOCAB_TENSORS:
                t = L.pad_vocab(t, padded)
            layer, sub = (
                (name.split(".", 3)[2], name.split(".", 3)[3])
                if name.startswith("decoder.layers.")
                else (None, name)
            )
            sd[f"decoder.layers.{layer}.{L.to_local(sub)}" if layer is not None else name] = t
        load_module_state(model, sd)
    model.float()
    device = module_device(model)
    tokens = to_device(tokens, device)
    b, s = tokens.shape
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    with torch.no_grad():
        logits = model(tokens, position_ids, None)
    return logits[..., : arch.vocab_size].float().cpu()


def logits_of(path: Path, fmt: str, tokens: torch.Tensor, iteration: int | None = None) -> torch.Tensor:
    return hf_logits(path, tokens) if fmt == "hf" else megatron_logits(path, fmt, tokens, iteration)


def weights_exact(a, b) -> bool:
    for name in a.names():
        x, y = a.get(name), b.get(name)
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            logger.info("weights differ at %s", name)
            return False
    return True


def parity(spec, reader, out_dir: Path, dtype: torch.dtype) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # DCP deprecation notes from megatron's loader
    tokens = sample_tokens(reader, reader.arch)
    src = logits_of(Path(spec.load_dir), reader.format, tokens, spec.load_iteration)
    dst = logits_of(out_dir, spec.target_format, tokens)
    diff = (src - dst).abs()
    out: dict[str, Any] = {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "top1_agreement": float((src.argmax(-1) == dst.argmax(-1)).float().mean()),
        "num_positions": int(tokens.numel()),
        "weights_exact": None,
    }
    if spec.lora_dir is None:
        target = open_checkpoint(out_dir, spec.target_format)
        same_dtype = (
            target.get("decoder.final_layernorm.weight").dtype
            == reader.get("decoder.final_layernorm.weight").dtype
        )
        if same_dtype:
            out["weights_exact"] = weights_exact(reader, target)
    return out
