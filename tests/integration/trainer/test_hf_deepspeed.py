"""hf-deepspeed jobs under torchrun (2 ranks, gloo): ZeRO 0-3 against plain DDP, the HF export, the
submit-time checks. The same ranks on Ray, with a killed rank: test_hf_deepspeed_on_ray.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.trainer.spec import validate
from services.trainer.wire import spec_from_dict
from shared.errors import InvalidArgument
from tests.fixtures.training import hf_ds_doc

# Largest |loss difference| over 8 steps allowed against DDP with the same seed and data, per ZeRO stage.
# Measured on this machine's CPU (2 ranks, fp32, these records): 2.4e-7 for every stage (6e-7 with longer
# records). ZeRO-1/2 reduce and update the same fp32 numbers as DDP in another grouping (flat buckets), ZeRO-3
# also gathers parameters for every forward; all stay far below the 1e-5 the issue asks for.
BOUND = {0: 2e-6, 1: 2e-6, 2: 2e-6, 3: 2e-6}
REPO = Path(__file__).resolve().parents[3]


def run_ranks(spec, tmp: Path, engine: str, probe: bool = False) -> dict:
    from shared.net import free_port

    spec_path, out = tmp / f"{engine}-spec.json", tmp / f"{engine}-losses.json"
    spec_path.write_text(spec.to_json())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
    ]
    cmd += ["-m", "services.trainer.hf_deepspeed", str(spec_path), "--engine", engine, "--losses", str(out)]
    if probe:
        cmd += ["--probe", str(tmp / f"{engine}-logits.pt")]
    r = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def ddp_curve(instruction_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    spec = spec_from_dict(hf_ds_doc(instruction_assets, tmp / "unused", deepspeed={"zero_stage": 0}))
    return run_ranks(spec, tmp, "ddp")["losses"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_reproduces_ddp(instruction_assets, tmp_path, ddp_curve, stage):
    over = {"deepspeed": {"zero_stage": stage}}
    if stage == 3:  # the export of the most sharded stage: consolidated from every rank's partitions
        over["checkpoint"] = {"export_hf_dir": str(tmp_path / "hf")}
    spec = spec_from_dict(hf_ds_doc(instruction_assets, tmp_path / "run", **over))
    validate(spec)
    got = run_ranks(spec, tmp_path, "deepspeed", probe=stage == 3)
    assert len(got["losses"]) == len(ddp_curve) == 8
    diff = max(abs(a - b) for a, b in zip(got["losses"], ddp_curve))
    assert diff <= BOUND[stage], (stage, diff, got["losses"], ddp_curve)
    assert ddp_curve[-1] < ddp_curve[0]  # it learns
    run = tmp_path / "run"
    assert (run / "latest").read_text() == "global_step8"
    assert sorted(p.name for p in run.glob("global_step*")) == ["global_step6", "global_step8"]  # keep_last 2
    meta = json.loads((run / "megastack.json").read_text())
    assert (
        meta["format"] == "deepspeed"
        and meta["zero_stage"] == stage
        and (run / "hf_model/config.json").is_file()
    )
    status = json.loads((run / "megastack-status.json").read_text())
    assert status["done"] and status["step"] == 8 and status["last_checkpoint_step"] == 8
    # the converter reads the save folder as a source of its own: consolidated, to torch_dist at TP=2
    from services.converter.conversion import ConvertSpec, convert

    result = convert(
        ConvertSpec(load_dir=run, save_dir=tmp_path / "mcore", target_format="mcore", tp=2, verify=True)
    )
    assert result.parity["weights_exact"] and result.parity["max_abs_logit_diff"] < 1e-4, result.parity
    if stage == 3:
        from transformers import AutoModelForCausalLM

        from llm.checkpoints import open_checkpoint

        trained = torch.load(tmp_path / "deepspeed-logits.pt")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        from llm.tokenizers import FastTokenizer
        from services.trainer.hf_data import Samples

        first = Samples.from_files(spec.data_files, FastTokenizer.from_dir(tmp_path / "hf"), 64).collate([0])
        with torch.no_grad():
            logits = model(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
        assert (logits - trained).abs().max().item() <= 1e-5
        assert open_checkpoint(tmp_path / "hf").arch.num_layers == model.config.num_hidden_layers
        _served_greedy_equals_transformers(tmp_path / "hf", model)


def _served_greedy_equals_transformers(model_dir: Path, model) -> None:
    from protos.textgen.v1 import textgen_pb2 as tpb
    from protos.textgen.v1 import textgen_pb2_grpc as tpb_grpc
    from shared.grpc.channel import make_channel
    from tests.fixtures.servers import start_textgen

    handle = start_textgen(model_dir)
    try:
        with make_channel(handle.address) as ch:
            resp = tpb_grpc.TextGenServiceStub(ch).Generate(
                tpb.GenerateRequest(
                    prompts=[tpb.Prompt(tokens=tpb.TokenIds(ids=[5, 6, 7, 8]))],
                    params=tpb.GenerationParams(
                        sampling=tpb.SamplingParams(greedy=True),
                        stopping=tpb.StoppingParams(max_new_tokens=8, ignore_eos=True),
                    ),
                )
            )
    finally:
        handle.stop()
    with torch.no_grad():
        want = model.generate(
            torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, do_sample=False, min_new_tokens=8
        )
    assert list(resp.completions[0].token_ids) == want[0, 4:].tolist()


def test_a_deepspeed_folder_naming_other_globals_is_refused_unread(instruction_assets, tmp_path):
    import pathlib
    import shutil

    from services.converter.conversion import ConvertSpec, convert

    run = tmp_path / "run"
    (run / "global_step1").mkdir(parents=True)
    (run / "latest").write_text("global_step1")
    shutil.copytree(instruction_assets["hf"], run / "hf_model")
    torch.save(
        {"module": {}, "x": pathlib.PurePosixPath("/")}, run / "global_step1" / "mp_rank_00_model_states.pt"
    )
    with pytest.raises(InvalidArgument, match="PurePosixPath.*does not unpickle") as e:
        convert(ConvertSpec(load_dir=run, save_dir=tmp_path / "out", target_format="hf"))
    assert e.value.field == "load_dir" and not (tmp_path / "out").exists()


def _refused(assets, tmp_path, field: str, match: str, **over) -> None:
    with pytest.raises(InvalidArgument, match=match) as e:
        validate(spec_from_dict(hf_ds_doc(assets, tmp_path / "run", **over)))
    assert e.value.field == field, e.value.field


def test_bad_specs_are_refused_naming_the_field(instruction_assets, tmp_path):
    a = instruction_assets
    _refused(a, tmp_path, "deepspeed.zero_stage", "0, 1, 2 or 3", deepspeed={"zero_stage": 4})
    _refused(a, tmp_path, "deepspeed.offload_optimizer", "on CPUs", deepspeed={"offload_optimizer": True})
    _refused(a, tmp_path, "deepspeed.offload_param", "zero_stage 3", deepspeed={"offload_param": True})
    _refused(a, tmp_path, "training.precision", "fp16 on CPU", training={"precision": "fp16"})
    _refused(a, tmp_path, "parallel.tensor_parallel", "must be 1", parallel={"tensor_parallel": 2})
    _refused(a, tmp_path, "training.train_iters", "exactly one", training={"epochs": 2})
    _refused(a, tmp_path, "training.global_batch_size", "multiple of", training={"global_batch_size": 6})
    (tmp_path / "empty").mkdir()
    _refused(a, tmp_path, "model.hf_model", "no config.json", model={"hf_model": str(tmp_path / "empty")})
    _refused(a, tmp_path, "model.init_from", "megatron-core kinds", model={"init_from": str(a["hf"])})
    _refused(a, tmp_path, "training.recompute", "whole layers", training={"recompute": "selective"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "no answer"}\n')
    _refused(a, tmp_path, "data.files", r"bad.jsonl:1: missing key 'output'", data={"files": [str(bad)]})
    _refused(a, tmp_path, "data.files", "does not exist", data={"files": [str(tmp_path / "none.json")]})
    _refused(a, tmp_path, "data.valid_files", "needs data.valid_files", training={"eval_interval": 2})
    few = tmp_path / "few.jsonl"
    few.write_text(Path(a["train"]).read_text().splitlines()[0] + "\n")
    _refused(
        a, tmp_path, "training.global_batch_size", "fewer than one global batch", data={"files": [str(few)]}
    )
    _refused(a, tmp_path, "checkpoint.export_hf_dir", "input", checkpoint={"export_hf_dir": str(a["hf"])})
    # and the megatron kinds refuse the hf-deepspeed fields instead of ignoring them
    with pytest.raises(InvalidArgument) as e:
        validate(spec_from_dict({**hf_ds_doc(a, tmp_path / "run"), "kind": "sft", "deepspeed": {}}))
    assert e.value.field == "model.hf_model"
    # epochs: 64 records, global batch 8 -> 8 steps per epoch
    validate(spec_from_dict(hf_ds_doc(a, tmp_path / "ok", training={"train_iters": 0, "epochs": 2})))
