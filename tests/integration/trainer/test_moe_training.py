"""Mixture-of-experts training through megatron-core: each MoE family's tiny model (4 experts, top-2), its
experts split over two data-parallel ranks (EP=2, the all-to-all token dispatcher on gloo), trains like a
single process: the same loss and grad norm at every step (fp32, rel 1e-5 / 1e-4) with the load-balancing
loss on. The Mixtral run also shows the aux loss and a capacity factor are live, that its torch_dist
checkpoint (each expert under its global index) holds the single process's final weights, and that it
converts to HF with megatron-core's logits equal to transformers'."""

from __future__ import annotations

import pytest

from services.converter.conversion import ConvertSpec, convert
from tests.fixtures.tiny import MOE_FAMILIES
from tests.fixtures.training import final_weights, train_steps

STEPS = 4


@pytest.fixture(scope="module")
def moe_mcore(tiny_models, tmp_path_factory):
    """family -> its tiny model converted to torch_dist (once per module)."""
    root = tmp_path_factory.mktemp("moe")
    for f in MOE_FAMILIES:
        convert(ConvertSpec(load_dir=tiny_models[f], save_dir=root / f, target_format="mcore"))
    return {f: root / f for f in MOE_FAMILIES}


def train(assets, mcore, save_dir, parallel, **training):
    return train_steps(assets, save_dir, STEPS, parallel, model={"init_from": str(mcore)}, training=training)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_parallel_trains_like_one_process(train_assets, moe_mcore, tmp_path, family):
    """Per family (Qwen2-MoE's shared expert and unnormalised top-k, Qwen3-MoE's q/k norms): the experts over
    two ranks train as in one process, the load-balancing loss on."""
    aux = {"moe_aux_loss_coeff": 0.01}  # the load-balancing loss in both runs: it shapes the gradients
    mcore = moe_mcore[family]
    one = train(train_assets, mcore, tmp_path / "one", {"tensor_parallel": 1}, **aux)
    ep2 = train(
        train_assets,
        mcore,
        tmp_path / "ep2",
        {"tensor_parallel": 1, "data_parallel": 2, "expert_parallel": 2},
        **aux,
    )
    assert [x["step"] for x in ep2] == [x["step"] for x in one] == list(range(1, STEPS + 1))
    for a, c in zip(one, ep2):
        print(f"{family} step {a['step']}: loss {a['loss']:.6f} ep2 {c['loss']:.6f}")  # noqa: T201
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, c)
        assert c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, c)
    assert one[-1]["loss"] < one[0]["loss"]
    if family != "mixtral":
        return
    no_aux = train(train_assets, mcore, tmp_path / "no-aux", {"tensor_parallel": 1})
    assert no_aux[0]["loss"] == one[0]["loss"]  # the same first step (the LM loss is reported) ...
    assert no_aux[0]["grad_norm"] != one[0]["grad_norm"]  # ... but the aux loss is in the gradients
    # a capacity factor drops the tokens an expert has no room for (lowest probability first): another forward
    capped = train(
        train_assets, mcore, tmp_path / "capped", {"tensor_parallel": 1}, moe_capacity_factor=0.5, **aux
    )
    assert capped[0]["loss"] != one[0]["loss"] and capped[-1]["loss"] < capped[0]["loss"]
    # each expert saved under its global index by the EP=2 run: the same final weights as the one process's
    final, mine = final_weights(tmp_path / "one"), final_weights(tmp_path / "ep2")
    assert mine.keys() == final.keys() and any(".local_experts.3." in n for n in final)
    for name, ref in final.items():
        scale = float(ref.abs().max()) or 1.0
        assert float((mine[name] - ref).abs().max()) <= 1e-5 * scale, name
    # and the trained checkpoint goes back to HF with megatron-core's logits equal to transformers'
    r = convert(
        ConvertSpec(load_dir=tmp_path / "ep2", save_dir=tmp_path / "hf", target_format="hf", verify=True)
    )
    assert r.parity["max_abs_logit_diff"] <= 1e-4 and r.parity["top1_agreement"] == 1.0
