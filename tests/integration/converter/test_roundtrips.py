"""HF <-> Megatron round trips for every family, TP {1,2}, PP {1,2}: exact weights, logits within 1e-5."""

from __future__ import annotations

import pytest
import torch

from llm.checkpoints import open_checkpoint
from llm.checkpoints.hf import HFCheckpoint
from services.converter.conversion import ConvertSpec, convert
from tests.fixtures.tiny import FAMILIES, MOE_FAMILIES
from tests.integration.converter.conftest import hf_reference, torchrun

TARGETS = [
    ("mcore", 1, 1),
    ("mcore", 2, 1),
    ("legacy", 1, 1),
    ("legacy", 2, 1),
    ("legacy", 1, 2),
    ("legacy", 2, 2),
]


def same_weights(a, b) -> None:
    a, b = HFCheckpoint(a), HFCheckpoint(b)
    assert a.names() == b.names()
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt,tp,pp", TARGETS, ids=[f"{f}-tp{t}-pp{p}" for f, t, p in TARGETS])
def test_round_trip(tmp_path, tiny_models, family, fmt, tp, pp):
    src = tiny_models[family]
    mid, back = tmp_path / "mid", tmp_path / "back"
    there = convert(ConvertSpec(load_dir=src, save_dir=mid, target_format=fmt, tp=tp, pp=pp, verify=True))
    assert there.parity["max_abs_logit_diff"] <= 1e-5 and there.parity["top1_agreement"] == 1.0
    assert there.parity["weights_exact"] is True
    home = convert(ConvertSpec(load_dir=mid, save_dir=back, target_format="hf", verify=True))
    assert home.parity["max_abs_logit_diff"] <= 1e-5
    for p in (there.parity, home.parity):  # every hidden state, the same points in both libraries
        names = [d["name"] for d in p["layers"]]
        assert names[0] == "embedding" and names[-1] == "final norm" and len(names) == 3  # 2 layers
        assert p["first_layer_over"] == "" and p["tolerance"] == 1e-4
    same_weights(src, back)
    # the HF side needs no original folder: config and tokenizer travel inside the Megatron checkpoint
    assert (back / "config.json").is_file() and (back / "tokenizer.json").is_file()


def test_megatron_to_megatron_resharding_without_hf(tmp_path, deep_llama):
    a, b, c, d = (tmp_path / x for x in "abcd")
    convert(ConvertSpec(load_dir=deep_llama, save_dir=a, target_format="legacy", tp=2, pp=2))
    convert(ConvertSpec(load_dir=a, save_dir=b, target_format="legacy", tp=1, pp=2, num_layer_list=(1, 3)))
    convert(
        ConvertSpec(load_dir=b, save_dir=c, target_format="legacy", tp=2, pp=2, layers_per_virtual_stage=1)
    )
    r = convert(ConvertSpec(load_dir=c, save_dir=d, target_format="mcore", verify=True))
    assert r.parity["weights_exact"] is True and r.parity["max_abs_logit_diff"] <= 1e-5
    lb = open_checkpoint(b).parallel_layout()
    assert lb["pipeline_parallel"] == 2 and [sum(x) for x in lb["layers"]] == [1, 3]
    lc = open_checkpoint(c).parallel_layout()
    assert lc["layers"] == ((1, 1), (1, 1))  # interleaved: stage 0 holds layers 0 and 2
    stage0 = torch.load(c / "release" / "mp_rank_00_000" / "model_optim_rng.pt", weights_only=False)
    assert {"model0", "model1"} <= set(stage0) and stage0["args"].virtual_pipeline_model_parallel_size == 2


def test_dtype_and_vocab_padding(tmp_path, tiny_models):
    src = tiny_models["llama"]
    mid = tmp_path / "bf16"
    convert(
        ConvertSpec(
            load_dir=src, save_dir=mid, target_format="mcore", params_dtype="bfloat16", divisible_by=100
        )
    )
    reader = open_checkpoint(mid)
    assert (
        reader.meta["padded_vocab_size"] == 600
        and reader.get("embedding.word_embeddings.weight").dtype == torch.bfloat16
    )
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(mid / "release")).read_metadata()
    assert tuple(md.state_dict_metadata["embedding.word_embeddings.weight"].size) == (600, 64)
    back = tmp_path / "back"
    convert(ConvertSpec(load_dir=mid, save_dir=back, target_format="hf", params_dtype="float32"))
    orig, got = HFCheckpoint(src), HFCheckpoint(back)
    for name in orig.names():
        assert torch.equal(got.get(name), orig.get(name).to(torch.bfloat16).float()), name


@pytest.mark.parametrize("fmt", ["mcore", "legacy"])
def test_megatron_core_loads_the_output_at_tp2(tmp_path, tiny_models, fmt):
    src = tiny_models["llama"]
    ckpt = tmp_path / "ckpt"
    convert(ConvertSpec(load_dir=src, save_dir=ckpt, target_format=fmt, tp=2))
    ref = hf_reference(src, tmp_path / "ref.pt")
    out = torchrun(["--tp", "2", "--ckpt", str(ckpt), "--format", fmt, "--ref", str(ref)])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "OK" in out.stdout


def test_megatron_core_loads_legacy_pp2_stages_strictly(tmp_path, tiny_models):
    ckpt = tmp_path / "ckpt"
    convert(ConvertSpec(load_dir=tiny_models["qwen2"], save_dir=ckpt, target_format="legacy", pp=2))
    out = torchrun(["--pp", "2", "--ckpt", str(ckpt), "--format", "legacy", "--ref", str(ckpt)])
    assert out.returncode == 0 and "OK strict load" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_parallel_legacy_round_trip(tmp_path, tiny_models, family):
    """HF -> legacy TP=2 x PP=2 x EP=2 (Megatron's mp_rank_TT_PPP_EEE folders, each EP rank holding its two
    experts numbered from 0) -> legacy EP=1 -> HF, bit-exact, megatron-core's logits == HF's each way; a
    checkpoint that has lost its megastack.json is still read (EP from the saved Megatron args)."""
    src, ep, flat, back = tiny_models[family], tmp_path / "ep", tmp_path / "flat", tmp_path / "back"
    there = convert(
        ConvertSpec(load_dir=src, save_dir=ep, target_format="legacy", tp=2, pp=2, ep=2, verify=True)
    )
    assert there.parity["max_abs_logit_diff"] <= 1e-5 and there.parity["weights_exact"] is True
    folders = sorted(p.name for p in (ep / "release").iterdir())
    assert folders == [
        f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)
    ]
    rank1 = torch.load(ep / "release" / "mp_rank_00_000_001" / "model_optim_rng.pt", weights_only=False)
    fc1 = {k for k in rank1["model"] if k.endswith("linear_fc1.weight") and ".experts." in k}
    assert fc1 == {"decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight",
                   "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"}  # fmt: skip
    assert rank1["args"].expert_model_parallel_size == 2 and rank1["args"].num_experts == 4
    hf = HFCheckpoint(src)
    expert2 = hf.family.to_megatron(hf.arch, 0, hf.get)[
        "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight"
    ]
    tp0 = rank1["model"]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"]  # global expert 2
    assert torch.equal(tp0, torch.cat([h.chunk(2)[0] for h in expert2.chunk(2)]))  # TP rank 0's gate and up
    assert open_checkpoint(ep).parallel_layout()["expert_parallel"] == 2
    (ep / "megastack.json").unlink()  # described from the args alone now
    flat_r = convert(ConvertSpec(load_dir=ep, save_dir=flat, target_format="legacy", verify=True))
    assert flat_r.parity["weights_exact"] is True and flat_r.parity["max_abs_logit_diff"] <= 1e-5
    assert open_checkpoint(flat).arch.family == family
    convert(ConvertSpec(load_dir=flat, save_dir=back, target_format="hf"))
    same_weights(src, back)


def test_expert_parallel_sizes_that_cannot_hold_are_refused_naming_the_field(tmp_path, tiny_models):
    from shared.errors import InvalidArgument

    for family, target, ep, words in [
        ("llama", "legacy", 2, "is dense"),
        ("mixtral", "legacy", 3, "does not divide the 4 experts"),
        ("mixtral", "hf", 2, "HF checkpoints are not split"),
        ("mixtral", "legacy", 0, "must be >= 1"),
    ]:
        out = tmp_path / f"{family}-{ep}-{target}"
        with pytest.raises(InvalidArgument, match=words) as e:
            convert(ConvertSpec(load_dir=tiny_models[family], save_dir=out, target_format=target, ep=ep))
        assert e.value.field == "target_expert_parallel_size" and not out.exists()


@pytest.mark.parametrize("fmt", ["mcore", "legacy"])
def test_megatron_core_loads_the_experts_at_ep2(tmp_path, tiny_models, fmt):
    """megatron-core itself at EP=2 (two ranks, two experts each, the all-to-all dispatcher): the legacy files
    of a --target-expert-parallel-size 2 conversion load strictly per rank, the torch_dist checkpoint through
    dist_checkpointing, and the logits equal HF's."""
    src = tiny_models["mixtral"]
    ckpt = tmp_path / "ckpt"
    convert(ConvertSpec(load_dir=src, save_dir=ckpt, target_format=fmt, ep=2 if fmt == "legacy" else 1))
    ref = hf_reference(src, tmp_path / "ref.pt")
    out = torchrun(["--ep", "2", "--ckpt", str(ckpt), "--format", fmt, "--ref", str(ref)])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "OK" in out.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_a_vocabulary_that_needs_padding_round_trips_for_every_family(tmp_path, tiny_tokenizer, family):
    """515 embedding rows (not a multiple of 128, as Qwen's and many tokenizers' are not): padded to
    Megatron's 768 at TP=2 x PP=2 (x EP=2 for MoE), megatron-core's logits == HF's, and back exactly."""
    from tests.fixtures.tiny import MOE_FAMILIES, make_tiny_hf

    src = make_tiny_hf(family, tmp_path / "hf", tiny_tokenizer, vocab_size=515)
    mid, back = tmp_path / "mid", tmp_path / "back"
    ep = 2 if family in MOE_FAMILIES else 1
    r = convert(
        ConvertSpec(load_dir=src, save_dir=mid, target_format="legacy", tp=2, pp=2, ep=ep, verify=True)
    )
    assert r.parity["max_abs_logit_diff"] <= 1e-5 and r.parity["weights_exact"] is True
    assert open_checkpoint(mid).meta["padded_vocab_size"] == 768
    convert(ConvertSpec(load_dir=mid, save_dir=back, target_format="hf"))
    same_weights(src, back)
