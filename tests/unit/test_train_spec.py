"""Bad TrainJobSpecs are refused up front, naming the field."""

import json

import pytest

from services.trainer.spec import validate
from services.trainer.wire import spec_from_dict
from shared.errors import InvalidArgument


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_tokenizer, tiny_models):
    from services.converter.conversion import ConvertSpec, convert
    from tools.preprocess.pipeline import Options, run

    root = tmp_path_factory.mktemp("spec")
    convert(ConvertSpec(load_dir=tiny_models["llama"], save_dir=root / "mc", target_format="mcore"))
    convert(ConvertSpec(load_dir=tiny_models["llama"], save_dir=root / "legacy", target_format="legacy"))
    (root / "c.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    run(Options(input=root / "c.jsonl", output_prefix=str(root / "d"), tokenizer_name_or_path=tiny_tokenizer))
    return root


def doc(root, **over):
    d = {
        "name": "x",
        "kind": "pretrain",
        "model": {"init_from": str(root / "mc")},
        "data": {"paths": [{"prefix": str(root / "d_text_document")}], "seq_length": 32},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 5},
        "checkpoint": {"save_dir": str(root / "run")},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return d


def test_a_good_spec_passes_and_defaults_apply(assets):
    spec = spec_from_dict(doc(assets))
    validate(spec)
    assert (
        spec.world_size == 1
        and spec.num_microbatches == 2
        and spec.lr_decay_style == "cosine"
        and spec.precision == "fp32"
    )


@pytest.mark.parametrize(
    "over,field,fragment",
    [
        (
            {"parallel": {"tensor_parallel": 3}},
            "parallel.tensor_parallel",
            "TP=3 does not divide the 4 attention heads",
        ),
        (
            {"training": {"global_batch_size": 5}},
            "training.global_batch_size",
            "must be a multiple of micro_batch_size x data_parallel",
        ),
        (
            {"data": {"paths": [{"prefix": "/nope/d"}], "seq_length": 32}},
            "data.paths",
            "data path /nope/d.bin does not exist",
        ),
        (
            {"parallel": {"sequence_parallel": True}},
            "parallel.sequence_parallel",
            "needs tensor_parallel >= 2",
        ),
        ({"data": {"seq_length": 4096}}, "data.seq_length", "exceeds the model's 256 positions"),
        ({"training": {"precision": "fp8"}}, "training.precision", "must be one of fp32, bf16, fp16"),
        (
            {"parallel": {"pipeline_parallel": 3}},
            "parallel.pipeline_parallel",
            "PP=3 does not divide 2 layers",
        ),
        ({"checkpoint": {"save_dir": ""}}, "checkpoint.save_dir", "is required"),
        ({"data": {"split": "90,10"}}, "data.split", "three non-negative weights"),
        (
            {"optimizer": {"lr_warmup_iters": 10**6}},
            "optimizer.lr_warmup_iters",
            "must be >= 0 and below the decay steps",
        ),
        (
            {"data": {"split": "100,0,0"}, "training": {"eval_interval": 5, "eval_iters": 1}},
            "data.split",
            "leaves no validation documents",
        ),
        ({"data": {"split": "0,100,0"}}, "data.split", "leaves no training documents"),
        ({"resources": {"peak_tflops_per_worker": -1}}, "resources.peak_tflops_per_worker", "must be >= 0"),
    ],
)
def test_bad_specs_name_the_field(assets, over, field, fragment):
    with pytest.raises(InvalidArgument, match=fragment) as e:
        validate(spec_from_dict(doc(assets, **over)))
    assert e.value.field == field


def test_init_from_must_be_torch_dist_and_fit_the_tp(assets):
    with pytest.raises(InvalidArgument, match="must be a torch_dist"):
        validate(spec_from_dict(doc(assets, model={"init_from": str(assets / "legacy")})))


def test_unknown_yaml_key_is_refused_by_name(assets, tmp_path):
    d = doc(assets)
    d["training"]["trian_iters"] = 5
    with pytest.raises(InvalidArgument, match='has no field named "trian_iters"'):
        spec_from_dict(d)
    (tmp_path / "s.yaml").write_text("name: [unclosed")
    from services.trainer.wire import load_yaml

    with pytest.raises(InvalidArgument, match="not valid YAML"):
        load_yaml(tmp_path / "s.yaml")


def test_split_documents_as_megatron_core_rounds_them():
    from services.trainer.datafiles import split_documents

    assert split_documents("949,50,1", 12) == [11, 1, 0]
    assert split_documents("98,1,1", 1000) == [980, 10, 10]
    assert split_documents("1,1,1", 10) == [3, 4, 3]
    assert sum(split_documents("7,2,1", 37)) == 37


def _tree(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "where, fragment",
    [
        (lambda r, t: r, "a folder that contains the input"),  # the folder holding the data and the model
        (lambda r, t: r / "mc", "the same folder as the input"),  # the init checkpoint itself
        (lambda r, t: r / "mc" / "release" / "run", "inside the input"),  # inside it
        (lambda r, t: r / "mc" / ".." / "mc", "the same folder as the input"),  # .. resolved
        (lambda r, t: t / "link-to-mc", "the same folder as the input"),  # a symlink resolved
        (lambda r, t: t / "notes", "already holds files that megastack did not write"),
        (lambda r, t: t / "notes" / "a.txt", "is a file"),
        (lambda r, t: r.anchor, "filesystem root|a folder that contains the input"),
        (lambda r, t: "~", "home directory"),
    ],
)
def test_save_dir_never_endangers_inputs_or_foreign_files(assets, tmp_path, where, fragment):
    (tmp_path / "link-to-mc").symlink_to(assets / "mc")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    before, mine = _tree(assets), _tree(tmp_path / "notes")
    with pytest.raises(InvalidArgument, match=fragment) as e:
        validate(spec_from_dict(doc(assets, checkpoint={"save_dir": str(where(assets, tmp_path))})))
    assert e.value.field == "checkpoint.save_dir"
    assert _tree(assets) == before and _tree(tmp_path / "notes") == mine


def test_save_dir_may_be_new_empty_or_the_trainers_own(assets, tmp_path):
    for d in (tmp_path / "new", tmp_path / "empty"):
        validate(spec_from_dict(doc(assets, checkpoint={"save_dir": str(d)})))
    (tmp_path / "empty").mkdir()
    validate(spec_from_dict(doc(assets, checkpoint={"save_dir": str(tmp_path / "empty")})))
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "iter_0000005").mkdir()
    (marked / ".megastack-output").write_text("{}")
    validate(spec_from_dict(doc(assets, checkpoint={"save_dir": str(marked)})))
    older = tmp_path / "older"  # a save folder from before the marker: its megastack.json says who wrote it
    older.mkdir()
    (older / "megastack.json").write_text(json.dumps({"created_by": "megastack trainer"}))
    validate(spec_from_dict(doc(assets, checkpoint={"save_dir": str(older)})))


@pytest.fixture
def six_layers(tiny_models, tmp_path):
    cfg = json.loads((tiny_models["llama"] / "config.json").read_text())
    cfg["num_hidden_layers"] = 6
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return {"architecture": str(tmp_path / "config.json"), "tokenizer": str(tiny_models["llama"])}


@pytest.mark.parametrize(
    "parallel, fragment",
    [
        ({"pipeline_parallel": 3, "num_layer_list": [1, 5]}, "has 2 entries for PP=3"),
        ({"pipeline_parallel": 2, "num_layer_list": [2, 3]}, "must be positive and sum to 6"),
        ({"pipeline_parallel": 4, "num_layer_list": [1, 2, 1, 2]}, "must have equal layer counts"),
        ({"num_layer_list": [6]}, "needs pipeline_parallel >= 2"),
        (
            {"pipeline_parallel": 2, "virtual_pipeline": 3, "num_layer_list": [3, 3]},
            "cannot be combined with a virtual pipeline",
        ),
    ],
)
def test_uneven_pipelines_that_megatron_core_cannot_build_are_refused_at_submit(
    assets, six_layers, parallel, fragment
):
    d = doc(assets, model=six_layers, parallel=parallel, training={"global_batch_size": 12})
    d["model"].pop("init_from")
    with pytest.raises(InvalidArgument, match=fragment) as e:
        validate(spec_from_dict(d))
    assert e.value.field == "parallel.num_layer_list"


def test_sequence_parallel_needs_a_sequence_that_splits_over_the_tp_ranks(train_assets, tmp_path):
    from tests.fixtures.training import spec_doc

    d = spec_doc(
        train_assets,
        tmp_path / "run",
        parallel={"tensor_parallel": 2, "sequence_parallel": True},
        data={"seq_length": 63},
    )
    with pytest.raises(InvalidArgument, match="multiple of tensor_parallel=2") as e:
        validate(spec_from_dict(d))
    assert e.value.field == "data.seq_length"


def test_uneven_pipelines_megatron_core_can_build_pass(assets, six_layers):
    for parallel in (
        {"pipeline_parallel": 2, "num_layer_list": [2, 4]},
        {"pipeline_parallel": 4, "num_layer_list": [1, 2, 2, 1]},
    ):
        d = doc(assets, model=six_layers, parallel=parallel, training={"global_batch_size": 12})
        d["model"].pop("init_from")
        validate(spec_from_dict(d))


def test_a_sliding_window_shorter_than_the_sequence_is_refused_naming_the_field(
    assets, tiny_models, tmp_path
):
    """megatron-core's local spec has no sliding-window attention: a Mistral v0.1-style window shorter than
    the training sequence would train another model than the one served; within the window it is the same."""
    cfg = json.loads((tiny_models["llama"] / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], sliding_window=32)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = {"architecture": str(tmp_path / "config.json"), "tokenizer": str(tiny_models["llama"])}
    d = doc(assets, model=model, data={"seq_length": 64})
    d["model"].pop("init_from")
    with pytest.raises(InvalidArgument, match="sliding window of 32") as e:
        validate(spec_from_dict(d))
    assert e.value.field == "data.seq_length"
    d["data"]["seq_length"] = 32
    validate(spec_from_dict(d))


def test_moe_settings_that_cannot_hold_are_refused_naming_the_field(assets, tiny_models):
    """Expert parallelism and the MoE options against the model and the layout: each refusal names its field;
    a layout that holds validates."""
    mixtral = {"architecture": str(tiny_models["mixtral"]), "tokenizer": str(tiny_models["mixtral"])}
    cases = [
        (
            mixtral,
            {"data_parallel": 2, "expert_parallel": 3},
            {},
            "parallel.expert_parallel",
            "does not divide",
        ),
        (mixtral, {"data_parallel": 1, "expert_parallel": 2}, {}, "parallel.expert_parallel", "must divide"),
        (mixtral, {"data_parallel": 2}, {"moe_grouped_gemm": True}, "training.moe_grouped_gemm", "GPU"),
        (mixtral, {"data_parallel": 2}, {"moe_aux_loss_coeff": -1.0}, "training.moe_aux_loss_coeff", ">= 0"),
        (
            mixtral,
            {"data_parallel": 2},
            {"moe_capacity_factor": -1.0},
            "training.moe_capacity_factor",
            ">= 0",
        ),
        (
            None,
            {"data_parallel": 2},
            {"moe_capacity_factor": 1.0},
            "training.moe_capacity_factor",
            "is dense",
        ),
        (None, {"data_parallel": 2, "expert_parallel": 2}, {}, "parallel.expert_parallel", "is dense"),
    ]
    for model, parallel, training, field, words in cases:
        d = doc(
            assets, parallel={"tensor_parallel": 1, **parallel}, training={"global_batch_size": 8, **training}
        )
        if model:
            d["model"] = model
        with pytest.raises(InvalidArgument, match=words) as e:
            validate(spec_from_dict(d))
        assert e.value.field == field
    d = doc(assets, parallel={"tensor_parallel": 1, "data_parallel": 2, "expert_parallel": 2})
    d["model"] = mixtral
    validate(spec_from_dict(d))
