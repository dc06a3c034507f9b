"""Bad input: a clear error naming the file or tensor, exit non-zero, nothing written at the target."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch

from services.converter.conversion import ConvertSpec, convert
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from shared.paths import REPO_ROOT
from tests.integration.converter.conftest import copy_model, leftovers


def check_nothing_written(target):
    assert not target.exists() and leftovers(target.parent) == []


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hi")
    with pytest.raises(InvalidArgument, match="is not a checkpoint: no config.json"):
        convert(ConvertSpec(load_dir=tmp_path / "src", save_dir=tmp_path / "out", target_format="mcore"))
    with pytest.raises(NotFound, match="does not exist"):
        convert(ConvertSpec(load_dir=tmp_path / "nope", save_dir=tmp_path / "out", target_format="mcore"))
    check_nothing_written(tmp_path / "out")


def test_unsupported_architecture(tmp_path, tiny_models):
    src = copy_model(tiny_models["llama"], tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArgument, match="unsupported architecture 'FalconForCausalLM'"):
        convert(ConvertSpec(load_dir=src, save_dir=tmp_path / "out", target_format="legacy"))
    check_nothing_written(tmp_path / "out")


def test_tp_that_does_not_divide_heads(tmp_path, tiny_models):
    with pytest.raises(InvalidArgument, match="TP=3 does not divide the 4 attention heads"):
        convert(
            ConvertSpec(
                load_dir=tiny_models["llama"], save_dir=tmp_path / "out", target_format="legacy", tp=3
            )
        )
    check_nothing_written(tmp_path / "out")


def test_truncated_safetensors(tmp_path, tiny_models):
    src = copy_model(tiny_models["qwen2"], tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5000])
    with pytest.raises(
        InvalidArgument, match=r"model.safetensors: not a readable safetensors file .*truncated"
    ):
        convert(ConvertSpec(load_dir=src, save_dir=tmp_path / "out", target_format="mcore"))
    check_nothing_written(tmp_path / "out")


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_models):
    from safetensors.torch import load_file, save_file

    src = copy_model(tiny_models["llama"], tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Exception, match="k_proj|shape"):
        convert(ConvertSpec(load_dir=src, save_dir=tmp_path / "out", target_format="mcore"))
    check_nothing_written(tmp_path / "out")


class NotWeights:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_legacy_pickle_that_is_not_weights_is_refused(tmp_path, tiny_models):
    mid = tmp_path / "mid"
    convert(ConvertSpec(load_dir=tiny_models["gpt2"], save_dir=mid, target_format="legacy"))
    rank = mid / "release" / "mp_rank_00" / "model_optim_rng.pt"
    sd = torch.load(rank, weights_only=False)
    sd["model"]["evil"] = NotWeights()
    torch.save(sd, rank, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(InvalidArgument, match=r"mp_rank_00/model_optim_rng.pt: not a loadable weights file"):
        convert(ConvertSpec(load_dir=mid, save_dir=tmp_path / "out", target_format="hf"))
    check_nothing_written(tmp_path / "out")


def test_existing_target_is_not_overwritten_unless_asked(tmp_path, tiny_models):
    out = tmp_path / "out"
    convert(
        ConvertSpec(load_dir=tiny_models["llama"], save_dir=out, target_format="hf")
    )  # megastack's own output
    before = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(AlreadyExists, match="pass --overwrite"):
        convert(ConvertSpec(load_dir=tiny_models["llama"], save_dir=out, target_format="hf"))
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    (out / "stale.txt").write_text("left by a previous run")
    convert(ConvertSpec(load_dir=tiny_models["llama"], save_dir=out, target_format="hf", overwrite=True))
    assert (
        not (out / "stale.txt").exists()
        and (out / "model.safetensors").is_file()
        and (out / ".megastack-output").is_file()
    )


def test_failure_midway_leaves_no_partial_checkpoint(tmp_path, tiny_models, monkeypatch):
    import services.converter.writers as writers

    calls = {"n": 0}
    real_add = writers.TorchDistWriter.add

    def failing_add(self, name, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real_add(self, name, t)

    monkeypatch.setattr(writers.TorchDistWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        convert(ConvertSpec(load_dir=tiny_models["llama"], save_dir=tmp_path / "out", target_format="mcore"))
    check_nothing_written(tmp_path / "out")


def test_cli_error_is_one_line_and_non_zero(tmp_path):
    (tmp_path / "src").mkdir()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.cli.main",
            "convert",
            "--load-dir",
            str(tmp_path / "src"),
            "--save-dir",
            str(tmp_path / "x"),
            "--target-format",
            "hf",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"megastack: error: {tmp_path / 'src'} is not a checkpoint: no config.json (HF), no "
        "latest_checkpointed_iteration.txt, iter_*/release folder (Megatron), no latest file or global_step* "
        "folder (DeepSpeed)"
    )
    check_nothing_written(tmp_path / "x")
