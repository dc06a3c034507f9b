"""Converting from a checkpoint needs no flags about the source (its layout and architecture are read from
it); the ones Megatron's and Pai's converters make users repeat are accepted, checked, and a mismatch is
refused naming both values, before anything is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from protos.converter.v1 import converter_pb2 as pb
from services.converter.conversion import ConvertSpec, convert
from services.converter.wire import spec_from_pb, spec_to_pb
from shared.errors import InvalidArgument
from shared.paths import REPO_ROOT
from tests.integration.converter.conftest import leftovers


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_models):
    """The tiny Llama (2 layers, hidden 64) as HF, legacy TP=2 x PP=2 and torch_dist."""
    root = tmp_path_factory.mktemp("sources")
    hf = tiny_models["llama"]
    convert(ConvertSpec(load_dir=hf, save_dir=root / "legacy", target_format="legacy", tp=2, pp=2))
    convert(ConvertSpec(load_dir=hf, save_dir=root / "mcore", target_format="mcore", tp=2))
    return {"hf": hf, "legacy": root / "legacy", "mcore": root / "mcore"}


def to_hf(src, out, **expect):
    return convert(ConvertSpec(load_dir=src, save_dir=out, target_format="hf", expect=tuple(expect.items())))


def test_no_flag_is_needed_and_true_ones_pass(sources, tmp_path):
    to_hf(sources["legacy"], tmp_path / "a")
    to_hf(
        sources["legacy"],
        tmp_path / "b",
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=2,
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        family="llama",
    )
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    ("fmt", "name", "stated", "has", "origin"),
    [
        ("legacy", "tensor_model_parallel_size", 4, 2, "its mp_rank_* folders"),
        ("legacy", "pipeline_model_parallel_size", 1, 2, "its mp_rank_* folders"),
        ("legacy", "expert_model_parallel_size", 2, 1, "its mp_rank_* folders and saved arguments"),
        ("legacy", "num_layers", 24, 2, "its megastack.json"),
        ("mcore", "hidden_size", 4096, 64, "its megastack.json"),
        ("mcore", "family", "qwen2", "llama", "its megastack.json"),
        ("hf", "tensor_model_parallel_size", 2, 1, "an HF checkpoint is not split"),
        ("hf", "num_query_groups", 8, 2, "its config.json"),
    ],
)
def test_a_stated_value_the_checkpoint_contradicts_is_refused_naming_both(
    sources, tmp_path, fmt, name, stated, has, origin
):
    with pytest.raises(InvalidArgument) as e:
        to_hf(sources[fmt], tmp_path / "out", **{name: stated})
    assert e.value.field == f"source.{name}"
    assert f"said to have {name} {stated}, but {sources[fmt]} has {name} {has} (from {origin})" in str(
        e.value
    )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_expert_parallel_source_is_read_and_a_wrong_ep_flag_refused(tiny_models, tmp_path):
    src = tmp_path / "ep2"
    convert(ConvertSpec(load_dir=tiny_models["mixtral"], save_dir=src, target_format="legacy", ep=2))
    to_hf(src, tmp_path / "ok", expert_model_parallel_size=2, family="mixtral")
    with pytest.raises(InvalidArgument) as e:
        to_hf(src, tmp_path / "out", expert_model_parallel_size=4)
    assert e.value.field == "source.expert_model_parallel_size" and "has expert_model_parallel_size 2" in str(
        e.value
    )


def test_torch_dist_loads_at_any_tp_so_a_stated_tp_is_not_held_against_it(sources, tmp_path):
    to_hf(sources["mcore"], tmp_path / "out", tensor_model_parallel_size=8, pipeline_model_parallel_size=4)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_cli_takes_megatrons_flag_names_and_errors_in_one_line(sources, tmp_path):
    def cli(*flags):
        return subprocess.run(
            [sys.executable, "-m", "tools.cli.main", "convert", "--load-dir", str(sources["legacy"]),
             "--save-dir", str(tmp_path / "out"), "--target-format", "hf", "--no-progress", *flags],
            capture_output=True, text=True, cwd=REPO_ROOT,
        )  # fmt: skip

    bad = cli("--tensor-model-parallel-size", "2", "--num-layers", "32")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith(
        "megastack: error: the source was said to have num_layers 32, "
        f"but {sources['legacy']} has num_layers 2"
    )
    assert not (tmp_path / "out").exists()
    good = cli("--tensor-model-parallel-size", "2", "--num-layers", "2", "--model-family", "llama")
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_message_carries_what_was_stated_and_refuses_negative_values(tmp_path):
    spec = ConvertSpec(
        load_dir=tmp_path / "a", save_dir=tmp_path / "b", target_format="hf",
        expect=(("tensor_model_parallel_size", 2), ("num_layers", 30), ("family", "qwen2")),
    )  # fmt: skip
    assert spec_from_pb(spec_to_pb(spec)) == spec
    m = spec_to_pb(spec)
    m.source.num_layers = -1
    with pytest.raises(InvalidArgument) as e:
        spec_from_pb(m)
    assert e.value.field == "source.num_layers"
    assert spec_from_pb(pb.ConversionSpec(load_dir="a", save_dir="b", target_format=1)).expect == ()
