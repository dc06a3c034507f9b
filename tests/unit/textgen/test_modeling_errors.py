"""A checkpoint the engine cannot serve is an UnsupportedModel naming what is wrong (the loader turns it
into one start-up line), never a KeyError or a crash at the first forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm.checkpoints import open_checkpoint
from services.textgen.modeling import DecoderLM, UnsupportedModel


@pytest.fixture(scope="module")
def reader(tiny_models):
    return open_checkpoint(tiny_models["llama"])


def build(arch, tensors):
    return DecoderLM(arch, tensors, dtype=torch.float32, device=torch.device("cpu"), max_len=32)


def test_the_tiny_model_builds(reader):
    build(reader.arch, list(reader.canonical_tensors()))


def test_missing_layer_tensor(reader):
    tensors = [(n, t) for n, t in reader.canonical_tensors() if n != "decoder.layers.0.mlp.linear_fc2.weight"]
    with pytest.raises(UnsupportedModel, match="lacks 1 tensor.*decoder.layers.0.mlp.linear_fc2.weight"):
        build(reader.arch, tensors)


def test_unexpected_tensor(reader):
    tensors = [*reader.canonical_tensors(), ("decoder.layers.0.mlp.router.weight", torch.zeros(2, 2))]
    with pytest.raises(UnsupportedModel, match="does not use.*decoder.layers.0.mlp.router.weight"):
        build(reader.arch, tensors)


def test_unknown_rope_scaling(reader):
    arch = dataclasses.replace(reader.arch, rope_scaling=(("factor", 4.0), ("rope_type", "yarn")))
    with pytest.raises(
        UnsupportedModel, match="rope_scaling type 'yarn'.*supported: default, linear, llama3"
    ):
        build(arch, list(reader.canonical_tensors()))
