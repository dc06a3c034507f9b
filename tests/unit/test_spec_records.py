"""One spec representation per job kind: a job record keeps the spec message's JSON mapping (the JSON the HTTP
job routes take), and reading it back gives the spec that was submitted."""

import json
from pathlib import Path

import pytest
import yaml

from services.converter.conversion import ConvertSpec
from services.converter.wire import spec_from_record as conversion_from_record
from services.converter.wire import spec_record as conversion_record
from services.evaluator.harness import EvalSpec
from services.evaluator.wire import spec_from_record as evaluation_from_record
from services.evaluator.wire import spec_record as evaluation_record
from services.trainer.spec import TrainSpec, absolutize
from services.trainer.wire import spec_from_dict, spec_from_pb, spec_from_record, spec_record, spec_to_pb
from shared.paths import REPO_ROOT

pytestmark = pytest.mark.unit


def on_disk(doc: dict) -> dict:
    return json.loads(json.dumps(doc))


@pytest.mark.parametrize("name", ["gpt2-345m-pretrain", "smollm2-continued-pretraining", "smollm2-sft"])
def test_train_specs_survive_their_record(name):
    doc = yaml.safe_load((REPO_ROOT / "deploy" / "examples" / f"{name}.yaml").read_text())
    spec = absolutize(spec_from_dict(doc))
    rec = on_disk(spec_record(spec))
    assert spec_from_record(rec) == spec
    assert rec["name"] == spec.name and rec["kind"].startswith("TRAIN_JOB_KIND_")  # the proto's own mapping


def test_a_minimal_train_spec_survives_its_record(tmp_path):
    """A spec as the service holds it (read from a message: zero values took their defaults)."""
    raw = TrainSpec(
        name="t",
        kind="pretrain",
        seq_length=8,
        train_iters=10,
        save_dir=str(tmp_path),
        data_paths=(("x", 1.0),),
    )
    spec = spec_from_pb(spec_to_pb(raw))
    assert spec.global_batch_size == 1 and raw.global_batch_size == 0  # defaults filled once, on the way in
    assert spec_from_record(on_disk(spec_record(spec))) == spec


def test_conversion_specs_survive_their_record():
    for spec in (
        ConvertSpec(load_dir=Path("/m/hf"), save_dir=Path("/m/out"), target_format="mcore"),
        ConvertSpec(
            load_dir=Path("/m/mc"),
            save_dir=Path("/m/lg"),
            target_format="legacy",
            source_format="mcore",
            tp=2,
            pp=2,
            num_layer_list=(3, 5),
            params_dtype="bfloat16",
            divisible_by=64,
            lora_dir=Path("/m/lora"),
            verify=True,
            overwrite=True,
            iteration=40,
        ),
    ):
        rec = on_disk(conversion_record(spec))
        assert conversion_from_record(rec) == spec
        assert rec["load_dir"] == str(spec.load_dir) and rec["target_format"].startswith("CHECKPOINT_FORMAT_")


def test_evaluation_specs_survive_their_record():
    spec = EvalSpec(tasks=("a",), hf_checkpoint="/m/hf", num_fewshot=2, limit=5, include_paths=("/t",))
    rec = on_disk(evaluation_record(spec))
    assert evaluation_from_record(rec) == spec and rec["hf_checkpoint"] == "/m/hf"
