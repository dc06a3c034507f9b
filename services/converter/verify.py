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


# One side's run: float32 logits [b, s, V] and hidden states [b, s, H] at the same points of both libraries:
# the embedding's output, the output of every layer but the last, and the final norm's output (what HF's
# ``output_hidden_states`` gives: its last entry is already normed).
Run = tuple[torch.Tensor, list[torch.Tensor]]


def hf_run(path: Path, tokens: torch.Tensor) -> Run:
    from transformers import AutoModelForCausalLM

    return _hf_forward(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), tokens)


def _hf_forward(model, tokens: torch.Tensor) -> Run:
    with torch.no_grad():
        out = model(to_device(tokens, module_device(model)), output_hidden_states=True)
    return out.logits.float().cpu(), [h.float().cpu() for h in out.hidden_states]


def megatron_run(path: Path, fmt: str, tokens: torch.Tensor, iteration: int | None = None) -> Run:
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
        and reader.parallel_layout()["expert_parallel"] == 1
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
    hidden: list[torch.Tensor] = []

    def keep(module, args, output) -> None:  # megatron-core's layers return (hidden [s, b, H], context)
        h = output[0] if isinstance(output, tuple) else output
        hidden.append(h.detach().float().transpose(0, 1).cpu())

    points = [model.embedding, *list(model.decoder.layers)[:-1], model.decoder.final_layernorm]
    hooks = [m.register_forward_hook(keep) for m in points]
    try:
        with torch.no_grad():
            logits = model(tokens, position_ids, None)
    finally:
        for h in hooks:
            h.remove()
    return logits[..., : arch.vocab_size].float().cpu(), hidden


def run_of(path: Path, fmt: str, tokens: torch.Tensor, iteration: int | None = None) -> Run:
    if fmt == "deepspeed":  # the consolidated weights in the transformers model of hf_model/config.json
        from llm.checkpoints.deepspeed import DeepSpeedCheckpoint

        return _hf_forward(DeepSpeedCheckpoint(path, iteration).hf_model(), tokens)
    return hf_run(path, tokens) if fmt == "hf" else megatron_run(path, fmt, tokens, iteration)


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
    src, src_hidden = run_of(Path(spec.load_dir), reader.format, tokens, spec.load_iteration)
    dst, dst_hidden = run_of(out_dir, spec.target_format, tokens)
    diff = (src - dst).abs()
    out: dict[str, Any] = {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "top1_agreement": float((src.argmax(-1) == dst.argmax(-1)).float().mean()),
        "num_positions": int(tokens.numel()),
        "weights_exact": None,
    }
    target = open_checkpoint(out_dir, spec.target_format)
    stored = (reader.dtype(), target.dtype())
    if spec.lora_dir is None and stored[0] == stored[1]:
        out["weights_exact"] = weights_exact(reader, target)
    tol, why = tolerance(*stored, lora=spec.lora_dir is not None)
    layers = layer_diffs(src_hidden, dst_hidden)
    over = [d["name"] for d in layers if d["relative_diff"] > tol]
    out.update(
        layers=layers,
        tolerance=tol,
        tolerance_reason=why,
        first_layer_over=over[0] if over and spec.lora_dir is None else "",
    )
    return out


def hidden_names(count: int) -> list[str]:
    """Names of ``count`` hidden states: the embedding, after layers 1..count-2 (1-based), the final norm."""
    return ["embedding", *(f"after layer {i}" for i in range(1, count - 1)), "final norm"]


def layer_diffs(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Per hidden state [b, s, H]: max |a - b|, the typical size of a position's vector (median RMS over
    positions) and the relative difference: the largest ||a - b|| / ||a|| over positions. Judged per
    position, so the huge activations a few positions carry (SmolLM2's first token reaches 2.4e4 where the
    typical RMS is ~1) do not set the bar for the others."""
    if len(a) != len(b):
        raise RuntimeError(f"the two models gave {len(a)} and {len(b)} hidden states")
    out = []
    for name, x, y in zip(hidden_names(len(a)), a, b):
        d = x - y
        norms = x.norm(dim=-1).clamp_min(1e-30)  # (b, s)
        out.append(
            {
                "name": name,
                "max_abs_diff": float(d.abs().max()),
                "scale": float(norms.median()) / x.shape[-1] ** 0.5,
                "relative_diff": float((d.norm(dim=-1) / norms).max()),
            }
        )
    return out


# Largest normal relative difference of a hidden state (layer_diffs: per position, ||diff|| / ||value||), by
# the coarser of the two checkpoints' stored dtypes; both sides run in float32, so the weights' rounding is
# all that differs.
SAME = (
    1e-4,
    "the same weights on both sides ({dtype}), both run in float32: only the order of summation in the two "
    "libraries' kernels differs (SmolLM2-135M: at most 2e-6 over its 30 layers)",
)
TOLERANCE = {
    torch.float16: (
        2e-2,
        "float16 keeps 11 significant bits: each weight moves by up to 2^-11 (0.05%) and the moves add up "
        "over the layers",
    ),
    torch.bfloat16: (
        1e-1,
        "bfloat16 keeps 8 significant bits: each weight moves by up to 2^-8 (0.4%) and the moves add up "
        "over the layers (a random 4-layer Llama: 1.6% at its final norm); differences of a few % per "
        "position and a top-1 agreement in the high 90s are normal, a layer far above its neighbours is not",
    ),
}
COARSER = (torch.float32, torch.float16, torch.bfloat16)


def tolerance(source: torch.dtype, target: torch.dtype, *, lora: bool = False) -> tuple[float, str]:
    """The relative tolerance for hidden states between checkpoints stored in ``source`` and ``target``
    dtypes, and why."""
    if lora:
        return (
            0.0,
            "a LoRA merge changes the weights: the report shows where the target departs from the base",
        )
    if source == target:
        return SAME[0], SAME[1].format(dtype=str(source).removeprefix("torch."))
    coarse = max((source, target), key=lambda d: COARSER.index(d) if d in COARSER else 0)
    return TOLERANCE.get(coarse, TOLERANCE[torch.bfloat16])
