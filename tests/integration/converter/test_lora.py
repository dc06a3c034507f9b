"""LoRA (PEFT format) merged during conversion: W' = W + alpha/r * B @ A."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llm.checkpoints.hf import HFCheckpoint
from services.converter.conversion import ConvertSpec, convert
from shared.errors import InvalidArgument


def write_adapter(path, modules: dict[str, tuple[int, int]], *, r=4, alpha=8, fan_in_fan_out=False, seed=0):
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out_f, in_f) in modules.items():
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    save_file(state, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": alpha,
                "fan_in_fan_out": fan_in_fan_out,
                "target_modules": ["q_proj", "v_proj"],
            }
        )
    )
    return state


def test_llama_lora_merge_into_megatron_and_back(tmp_path, tiny_models):
    src = tiny_models["llama"]
    mods = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.1.self_attn.v_proj": (32, 64)}
    state = write_adapter(tmp_path / "lora", mods)
    convert(
        ConvertSpec(
            load_dir=src, save_dir=tmp_path / "mc", target_format="legacy", tp=2, lora_dir=tmp_path / "lora"
        )
    )
    convert(ConvertSpec(load_dir=tmp_path / "mc", save_dir=tmp_path / "hf", target_format="hf"))
    base, merged = HFCheckpoint(src), HFCheckpoint(tmp_path / "hf")
    for module in mods:
        a, b = (
            state[f"base_model.model.{module}.lora_A.weight"],
            state[f"base_model.model.{module}.lora_B.weight"],
        )
        expected = base.get(module + ".weight") + 2.0 * (b @ a)
        assert torch.allclose(merged.get(module + ".weight"), expected, atol=1e-6)
    assert torch.equal(
        merged.get("model.layers.0.self_attn.k_proj.weight"),
        base.get("model.layers.0.self_attn.k_proj.weight"),
    )


def test_gpt2_conv1d_lora_uses_fan_in_fan_out(tmp_path, tiny_models):
    src = tiny_models["gpt2"]
    state = write_adapter(
        tmp_path / "lora", {"transformer.h.0.attn.c_attn": (192, 64)}, fan_in_fan_out=True, alpha=4
    )
    convert(
        ConvertSpec(load_dir=src, save_dir=tmp_path / "hf", target_format="hf", lora_dir=tmp_path / "lora")
    )
    a = state["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    got = HFCheckpoint(tmp_path / "hf").get("transformer.h.0.attn.c_attn.weight")
    assert torch.allclose(
        got, HFCheckpoint(src).get("transformer.h.0.attn.c_attn.weight") + (b @ a).t(), atol=1e-6
    )


def test_adapter_that_does_not_fit_is_refused(tmp_path, tiny_models):
    write_adapter(tmp_path / "lora", {"model.layers.7.self_attn.q_proj": (64, 64)})
    with pytest.raises(
        InvalidArgument, match="LoRA module model.layers.7.self_attn.q_proj matches no tensor"
    ):
        convert(
            ConvertSpec(
                load_dir=tiny_models["llama"],
                save_dir=tmp_path / "out",
                target_format="hf",
                lora_dir=tmp_path / "lora",
            )
        )
    assert not (tmp_path / "out").exists()
    (tmp_path / "notlora").mkdir()
    with pytest.raises(InvalidArgument, match="no adapter_config.json"):
        convert(
            ConvertSpec(
                load_dir=tiny_models["llama"],
                save_dir=tmp_path / "out",
                target_format="hf",
                lora_dir=tmp_path / "notlora",
            )
        )


def test_the_adapter_weights_are_read_once_per_conversion_and_not_at_validation(
    tmp_path, tiny_models, monkeypatch
):
    import services.converter.lora as lora
    from services.converter.conversion import validate

    write_adapter(tmp_path / "lora", {"model.layers.0.self_attn.q_proj": (64, 64)})
    reads = []
    real = lora.load_file
    monkeypatch.setattr(lora, "load_file", lambda p: reads.append(p) or real(p))
    spec = ConvertSpec(
        load_dir=tiny_models["llama"],
        save_dir=tmp_path / "hf",
        target_format="hf",
        lora_dir=tmp_path / "lora",
    )
    validate(spec)  # what the service runs on its gRPC thread: the config and the files, not the weights
    assert reads == []
    convert(spec)
    assert len(reads) == 1
