"""HF <-> Megatron canonical layout: exact round trips, key coverage, QKV interleave."""

import json

import pytest
import torch

from llm.checkpoints.hf import HFCheckpoint
from llm.models.base import fuse_qkv, split_qkv
from llm.models.registry import BY_ARCHITECTURE, family_for_architecture
from shared.errors import InvalidArgument
from tests.fixtures.tiny import FAMILIES


def test_fuse_split_qkv_inverse_and_group_layout():
    nh, ng, d, H = 6, 2, 4, 8
    q, k, v = torch.randn(nh * d, H), torch.randn(ng * d, H), torch.randn(ng * d, H)
    fused = fuse_qkv(q, k, v, num_groups=ng, head_dim=d)
    # group 0 = [q heads 0..2 | k0 | v0], as Megatron's linear_qkv stores it
    assert torch.equal(fused[: 3 * d], q[: 3 * d]) and torch.equal(fused[3 * d : 4 * d], k[:d])
    q2, k2, v2 = split_qkv(fused, num_heads=nh, num_groups=ng, head_dim=d)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact_and_covers_every_tensor(tiny_models, family):
    ckpt = HFCheckpoint(tiny_models[family])
    names = [n for n, _ in ckpt.canonical_tensors()]
    canonical = dict(ckpt.canonical_tensors())
    assert sorted(names) == sorted(ckpt.family.megatron_tensor_names(ckpt.arch))
    layers = [int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")]
    assert layers == sorted(layers), "tensors must stream layer by layer"
    back = dict(ckpt.family.megatron_to_hf(ckpt.arch, canonical.__getitem__))
    expected = set(ckpt.family.hf_tensor_names(ckpt.arch))
    assert set(back) == expected
    for name in expected:
        assert torch.equal(back[name], ckpt.get(name)), name


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(
        InvalidArgument, match="unsupported architecture 'FalconForCausalLM'; supported: GPT2LMHeadModel"
    ):
        family_for_architecture("FalconForCausalLM")
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"} <= set(BY_ARCHITECTURE)


def test_hf_config_round_trip(tiny_models):
    for family in FAMILIES:
        ckpt = HFCheckpoint(tiny_models[family])
        cfg = ckpt.family.hf_config_from_arch(ckpt.arch)
        assert ckpt.family.arch_from_hf_config(cfg) == ckpt.arch


def test_sliding_window_is_carried_for_mistral_and_refused_where_it_is_per_layer():
    from llm.models.registry import arch_from_hf_config

    base = dict(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    mistral = arch_from_hf_config({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 8})
    assert mistral.sliding_window == 8 and mistral.family == "llama"
    cfg = family_for_architecture("MistralForCausalLM").hf_config_from_arch(mistral)
    assert cfg["model_type"] == "mistral" and cfg["sliding_window"] == 8  # HF loads it as Mistral again
    assert arch_from_hf_config(cfg) == mistral
    v02 = arch_from_hf_config({**base, "architectures": ["MistralForCausalLM"], "sliding_window": None})
    assert v02.sliding_window is None
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096}
    assert arch_from_hf_config({**qwen, "use_sliding_window": False}).sliding_window is None
    with pytest.raises(InvalidArgument) as e:  # Qwen's window covers only some layers: refused by name
        arch_from_hf_config({**qwen, "use_sliding_window": True})
    assert e.value.field == "use_sliding_window"


def test_llama_biases_go_both_ways_or_are_refused_by_name(tiny_tokenizer, tmp_path):
    """attention_bias + mlp_bias (every q/k/v/o and MLP projection biased): HF -> torch_dist -> HF is exact,
    megatron-core's logits match HF's (--verify), textgen's greedy tokens too; the two flags differing is
    refused, naming the field."""
    from llm.checkpoints import open_checkpoint
    from llm.models.registry import arch_from_hf_config
    from services.converter.conversion import ConvertSpec, convert
    from tools.tiny import make_tiny_hf

    src = make_tiny_hf("llama", tmp_path / "biased", tiny_tokenizer, attention_bias=True, mlp_bias=True)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    with torch.no_grad():  # HF starts biases at zero: random ones, so a dropped bias shows
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(str(src))
    ckpt = HFCheckpoint(src)
    assert ckpt.arch.qkv_bias and ckpt.arch.linear_bias
    assert "model.layers.0.self_attn.o_proj.bias" in ckpt.family.hf_tensor_names(ckpt.arch)
    r = convert(ConvertSpec(load_dir=src, save_dir=tmp_path / "mcore", target_format="mcore", verify=True))
    assert r.parity["max_abs_logit_diff"] < 1e-4 and r.parity["weights_exact"]
    convert(ConvertSpec(load_dir=tmp_path / "mcore", save_dir=tmp_path / "back", target_format="hf"))
    back = open_checkpoint(tmp_path / "back")
    for name in ckpt.family.hf_tensor_names(ckpt.arch):
        assert torch.equal(back.ckpt.get(name), ckpt.get(name)), name
    from services.textgen.config import TextgenConfig
    from services.textgen.loader import load_served_model
    from tests.unit.textgen.test_engine import greedy_ref, req

    served = load_served_model(TextgenConfig(model_dir=src, max_context_tokens=64, port=0, metrics_port=0))
    served.engine.start()
    try:  # the engine serves the biases too: greedy tokens as HF's
        ids = list(range(5, 21))
        assert served.engine.submit([req(ids, n=8)])[0].result().token_ids == greedy_ref(model.eval(), ids, 8)
    finally:
        served.engine.stop()
    cfg = json.loads((src / "config.json").read_text())
    with pytest.raises(InvalidArgument) as e:
        arch_from_hf_config({**cfg, "mlp_bias": False})
    assert e.value.field == "mlp_bias"


def test_list_families_prints_every_registered_family_and_whether_its_tests_run(capsys):
    from llm.models.registry import FAMILIES as REGISTERED
    from tools.cli.main import main

    with pytest.raises(SystemExit) as e:  # like --help: no --load-dir needed
        main(["convert", "--list-families"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["family", "HF", "architectures"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(REGISTERED)
    for name, line in rows.items():  # the per-family tests run over tools/tiny.py FAMILIES
        assert line.rstrip().endswith("yes" if name in FAMILIES else "no"), line
        assert all(a in line for a in REGISTERED[name].hf_architectures)


def test_moe_configs_map_their_router_and_refuse_layouts_megastack_cannot_hold(tiny_models):
    """Mixtral always renormalises its top-k weights, Qwen only with norm_topk_prob; Qwen configs that make
    some layers dense are refused naming the setting."""
    from llm.models.registry import arch_from_hf_config

    archs = {f: HFCheckpoint(tiny_models[f]).arch for f in ("mixtral", "qwen2_moe", "qwen3_moe")}
    assert [(a.num_experts, a.moe_topk, a.moe_ffn_hidden_size) for a in archs.values()] == [(4, 2, 48)] * 3
    assert archs["mixtral"].moe_norm_topk and archs["qwen3_moe"].moe_norm_topk
    assert not archs["qwen2_moe"].moe_norm_topk and archs["qwen2_moe"].shared_expert_ffn == 80
    assert archs["qwen2_moe"].shared_expert_gate and archs["qwen3_moe"].qk_layernorm
    cfg = json.loads((tiny_models["qwen3_moe"] / "config.json").read_text())
    for key, value in (("mlp_only_layers", [1]), ("decoder_sparse_step", 2)):
        with pytest.raises(InvalidArgument) as e:
            arch_from_hf_config({**cfg, key: value})
        assert e.value.field == key
