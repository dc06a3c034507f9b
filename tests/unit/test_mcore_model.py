"""llm/mcore/model.py: which layer spec a build uses, what moves batches to the model, and which
_extra_state objects a load asks for. The Transformer Engine side is exercised by gpu_check on a GPU;
here its selection logic is checked with TE's availability stubbed."""

from __future__ import annotations

import logging

import pytest
import torch

from llm.devices import module_device, to_device
from llm.mcore import model as M


@pytest.fixture
def te(monkeypatch):
    def set_(usable: bool, why: str = "stub"):
        monkeypatch.setattr(M, "transformer_engine_status", lambda: (usable, why))
        M._fallback_note.cache_clear()

    yield set_
    M._fallback_note.cache_clear()


def test_auto_uses_transformer_engine_when_it_imports(te):
    te(True, "transformer_engine imports")
    assert M.resolve_impl("auto") == "transformer_engine" and M.resolve_impl("local") == "local"


def test_auto_falls_back_to_local_and_says_so_once(te, caplog):
    te(False, "transformer_engine does not import (ModuleNotFoundError: x)")
    with caplog.at_level(logging.INFO, logger="llm.mcore.model"):
        assert M.resolve_impl("auto") == "local"
        assert M.resolve_impl("auto") == "local"
    lines = [r.getMessage() for r in caplog.records if "local layer spec" in r.getMessage()]
    assert len(lines) == 1 and "does not import" in lines[0]


def test_asking_for_transformer_engine_where_it_is_missing_is_an_error(te):
    te(False, "no CUDA device")
    with pytest.raises(ValueError, match="transformer_impl=transformer_engine but no CUDA device"):
        M.resolve_impl("transformer_engine")
    with pytest.raises(ValueError, match="must be one of"):
        M.resolve_impl("flash")


def test_layer_spec_is_tes_or_ours(te, monkeypatch):
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer import transformer_block

    from llm.models.base import ArchConfig

    sentinel = object()
    # no parallel state in a unit test: a world of one builds every layer
    monkeypatch.setattr(
        transformer_block, "get_num_layers_to_build", lambda config, vp_stage=None: config.num_layers
    )
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec", lambda: sentinel)
    te(True)
    assert M.layer_spec(None, None, impl="auto") is sentinel
    te(False)
    arch = ArchConfig(
        family="llama",
        architecture="LlamaForCausalLM",
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=16,
        ffn_hidden_size=128,
        max_position_embeddings=128,
        normalization="RMSNorm",
        norm_eps=1e-5,
        activation="swiglu",
        position_embedding="rope",
    )
    config = M.transformer_config(arch)
    block = M.layer_spec(arch, config, impl="auto")
    assert block.layer_norm is M.SequenceParallelNorm and len(block.layer_specs) == 2
    sub = block.layer_specs[0].submodules
    assert (
        sub.input_layernorm.module is M.SequenceParallelNorm
        and sub.pre_mlp_layernorm.module is M.SequenceParallelNorm
    )
    # the torch_dist names stay TE's: checkpoints load under either spec
    assert sub.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }


@pytest.mark.parametrize(
    "normalization, cls", [("RMSNorm", torch.nn.RMSNorm), ("LayerNorm", torch.nn.LayerNorm)]
)
def test_sequence_parallel_norm_tags_its_weights(normalization, cls):
    class Cfg:
        sequence_parallel = True

    Cfg.normalization = normalization
    norm = M.SequenceParallelNorm(Cfg, 8, eps=1e-6)
    assert isinstance(norm, cls) and all(p.sequence_parallel for p in norm.parameters())
    Cfg.normalization = "L2Norm"
    with pytest.raises(ValueError, match="not supported"):
        M.SequenceParallelNorm(Cfg, 8)


def test_only_absent_extra_state_objects_are_dropped():
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    def obj(key):
        return ShardedObject(key, None, (1,), (0,), replica_id=0)

    present, absent = (
        obj("decoder.layers.self_attention.linear_qkv._extra_state"),
        obj("decoder.layers.self_attention.core_attention._extra_state"),
    )
    weight = torch.zeros(2)
    state = {"model": {"a": present, "b": absent, "w": weight, "nested": [absent, weight]}}
    out = M.without_absent_extra_state(state, {present.key + "/shard_0_1", "w"})
    assert set(out["model"]) == {"a", "w", "nested"} and out["model"]["nested"] == [weight]
    assert out["model"]["a"] is present


def test_load_module_state_tolerates_only_missing_extra_state():
    m = torch.nn.Linear(2, 2)
    M.load_module_state(m, {"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
    assert torch.equal(m.weight, torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="missing \\['bias'\\]"):
        M.load_module_state(m, {"weight": torch.ones(2, 2)})
    with pytest.raises(RuntimeError, match="unexpected"):
        M.load_module_state(m, {"weight": torch.ones(2, 2), "bias": torch.zeros(2), "extra": torch.zeros(1)})


def test_to_device_moves_every_tensor_and_keeps_the_rest():
    batch = {
        "tokens": torch.ones(2, dtype=torch.long),
        "nested": [torch.zeros(1), ("x", torch.ones(1))],
        "n": 3,
    }
    out = to_device(batch, "meta")
    assert out["tokens"].device.type == "meta" and out["nested"][0].device.type == "meta"
    assert out["nested"][1][0] == "x" and out["nested"][1][1].device.type == "meta" and out["n"] == 3
    assert isinstance(out["nested"][1], tuple)
    assert module_device(torch.nn.Linear(1, 1, device="meta")).type == "meta"
    assert module_device(torch.nn.ReLU()).type == "cpu"
