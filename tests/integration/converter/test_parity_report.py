"""--verify's per-layer report: the first hidden state over the dtype's tolerance names where a conversion
went wrong, the tolerance comes with its reason, and bfloat16's normal differences are not called wrong."""

from __future__ import annotations

import re

import pytest
import torch

import services.converter.conversion as conversion
from services.converter.conversion import ConvertSpec, convert
from services.converter.verify import tolerance


@pytest.mark.parametrize(
    ("layer", "first_over"), [(0, "after layer 1"), (2, "after layer 3"), (3, "final norm")]
)
def test_a_wrong_tensor_is_found_at_its_layer(tmp_path, deep_llama, monkeypatch, layer, first_over):
    real = conversion._source_getter

    def broken(reader, spec):
        get = real(reader, spec)
        bad = f"decoder.layers.{layer}.mlp.linear_fc2.weight"
        return lambda name: get(name) * 1.05 if name == bad else get(name)

    monkeypatch.setattr(conversion, "_source_getter", broken)
    r = convert(
        ConvertSpec(load_dir=deep_llama, save_dir=tmp_path / "out", target_format="mcore", verify=True)
    )
    p = r.parity
    assert p["weights_exact"] is False
    assert p["first_layer_over"] == first_over
    names = [d["name"] for d in p["layers"]]
    assert names == ["embedding", "after layer 1", "after layer 2", "after layer 3", "final norm"]
    before = names.index(first_over)
    assert all(d["relative_diff"] <= 1e-4 for d in p["layers"][:before])
    assert all(d["relative_diff"] > 1e-4 for d in p["layers"][before:])
    assert re.search(rf"first layer over +{first_over} \(tolerance 1e-04, relative\)", r.summary)
    assert "hidden state" in r.summary and "relative diff" in r.summary


def test_bfloat16_rounding_is_within_its_stated_tolerance(tmp_path, deep_llama):
    r = convert(
        ConvertSpec(
            load_dir=deep_llama, save_dir=tmp_path / "out", target_format="mcore", params_dtype="bfloat16",
            verify=True,
        )
    )  # fmt: skip
    p = r.parity
    assert p["tolerance"] == 1e-1 and "bfloat16 keeps 8 significant bits" in p["tolerance_reason"]
    assert p["first_layer_over"] == ""
    # and it is not the float32 tolerance in disguise: bfloat16 weights do move the hidden states
    assert max(d["relative_diff"] for d in p["layers"]) > 1e-4


def test_tolerance_by_stored_dtypes():
    assert tolerance(torch.float32, torch.float32)[0] == 1e-4
    assert "(bfloat16)" in tolerance(torch.bfloat16, torch.bfloat16)[1]
    assert tolerance(torch.float32, torch.bfloat16)[0] == tolerance(torch.bfloat16, torch.float16)[0] == 1e-1
    assert tolerance(torch.float16, torch.float32)[0] == 2e-2
    assert tolerance(torch.float32, torch.float32, lora=True)[0] == 0.0
