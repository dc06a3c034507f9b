"""`megastack train import-args`: Megatron flag lists and Pai positional arguments -> TrainJobSpec YAML."""

from __future__ import annotations

import json

import pytest
import yaml

from services.trainer.spec import validate
from services.trainer.wire import spec_from_dict
from shared.errors import InvalidArgument
from tools.cli.import_args import import_args, split_command_text
from tools.cli.main import main

GPT2_345M = """
torchrun --nproc_per_node 2 --nnodes 1 --node_rank 0 --master_addr localhost --master_port 6000 \\
    pretrain_gpt.py --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \\
    --num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 1024 \\
    --max-position-embeddings 1024 --micro-batch-size 4 --global-batch-size 8 --lr 0.00015 \\
    --train-iters 500000 --lr-decay-iters 320000 --lr-decay-style cosine --min-lr 1.0e-5 \\
    --weight-decay 1e-2 --lr-warmup-fraction .01 --clip-grad 1.0 --fp16 \\
    --data-path {data} --vocab-file {bpe}/vocab.json --merge-file {bpe}/merges.txt --split 949,50,1 \\
    --log-interval 100 --save-interval 10000 --eval-interval 1000 --eval-iters 10 \\
    --save {save} --load {save}   # Megatron-LM examples/gpt3/train_gpt2_345m_distributed.sh
"""


@pytest.fixture(scope="module")
def bpe():
    from tools.assets import ensure_asset

    return ensure_asset("gpt2-bpe").parent


def test_megatron_gpt2_345m_flags_become_a_spec_and_an_architecture(bpe, tmp_path):
    imp = import_args(
        split_command_text(GPT2_345M.format(data="d/gpt2_text_document", bpe=bpe, save=tmp_path / "ck"))
    )
    d = imp.doc
    assert d["parallel"] == {"tensor_parallel": 1, "pipeline_parallel": 1, "data_parallel": 2}
    assert d["optimizer"]["lr_warmup_iters"] == 3200 and d["optimizer"]["lr_decay_iters"] == 320000
    assert d["training"]["precision"] == "fp16" and d["training"]["global_batch_size"] == 8
    assert (
        d["data"]["paths"] == [{"prefix": "d/gpt2_text_document", "weight": 1.0}]
        and d["data"]["split"] == "949,50,1"
    )
    assert (
        d["model"]["tokenizer"] == str(bpe) and "init_from" not in d["model"]
    )  # --load == --save: resume, not init
    cfg = imp.hf_config
    assert (cfg["architectures"], cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"]) == (
        ["GPT2LMHeadModel"],
        24,
        1024,
        16,
        50257,
    )
    assert not imp.unmapped
    assert {i for i, _ in imp.no_effect} >= {"torchrun", "pretrain_gpt.py", "--master_port 6000"}


def test_every_item_is_accounted_for(bpe, tmp_path):
    tokens = split_command_text(GPT2_345M.format(data="d", bpe=bpe, save=tmp_path)) + [
        "--init-method-std",
        "0.006",
        "--frobnicate",
        "3",
        "--use-flash-attn",
    ]
    imp = import_args(tokens)
    flags = {t for t in tokens if t.startswith("--")}
    reported = " ".join(i for i, _ in imp.mapped + imp.no_effect + imp.unmapped)
    assert all(f in reported for f in flags), flags - {f for f in flags if f in reported}
    assert [i for i, _ in imp.unmapped] == ["--init-method-std 0.006", "--frobnicate 3"]
    assert "Transformer Engine" in dict(imp.mapped)["--use-flash-attn"]


@pytest.mark.parametrize("impl, expected", [("transformer_engine", "auto"), ("local", "local")])
def test_transformer_impl_says_what_the_training_nodes_will_run(bpe, tmp_path, impl, expected):
    tokens = split_command_text(GPT2_345M.format(data="d", bpe=bpe, save=tmp_path)) + [
        "--transformer-impl",
        impl,
    ]
    imp = import_args(tokens)
    assert imp.doc["training"]["transformer_impl"] == expected
    why = dict(imp.mapped)[f"--transformer-impl {impl}"]
    assert "training nodes" in why and "on this machine TE is" in why
    assert not any("transformer-impl" in i for i, _ in imp.no_effect)


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--bf16"], "--fp16 and --bf16 contradict"),
        (["--lr-warmup-iters", "10"], "--lr-warmup-fraction and --lr-warmup-iters contradict"),
        (["--lr", "0.1"], "--lr is given twice"),
        (["--hidden-size", "$HIDDEN"], "unresolved shell variable $HIDDEN"),
        (["--sequence-parallel", "yes"], "takes no value"),
        (["--num-layers-per-virtual-pipeline-stage", "5"], "does not divide 24 layers"),
    ],
)
def test_contradictions_and_garbage_are_errors(bpe, tmp_path, extra, fragment):
    tokens = split_command_text(GPT2_345M.format(data="d", bpe=bpe, save=tmp_path)) + extra
    with pytest.raises(InvalidArgument, match=fragment.replace("$", r"\$")):
        import_args(tokens)


def test_cli_refuses_unmapped_then_writes_a_validated_spec(train_assets, tiny_tokenizer, tmp_path, capsys):
    flags = (
        "--tensor-model-parallel-size 2 --num-layers 2 --hidden-size 64 --num-attention-heads 4 "
        "--seq-length 64 "
        "--max-position-embeddings 128 --swiglu --normalization RMSNorm --position-embedding-type rope "
        "--disable-bias-linear "
        f"--micro-batch-size 2 --global-batch-size 8 --train-iters 20 --lr 0.002 --lr-warmup-iters 2 --bf16 "
        f"--data-path {train_assets['data']} --tokenizer-type HuggingFaceTokenizer --tokenizer-model "
        f"{tiny_tokenizer} "
        f"--save {tmp_path / 'run'} --init-method-std 0.01"
    ).split()
    out = tmp_path / "spec.yaml"
    assert main(["train", "import-args", "-o", str(out), "--", *flags]) == 2
    assert "NOT MAPPED --init-method-std 0.01" in capsys.readouterr().out and not out.exists()
    assert main(["train", "import-args", "-o", str(out), "--allow-unmapped", "--", *flags]) == 0
    text = out.read_text()
    assert "#   --init-method-std 0.01: megastack initialises" in text
    spec = spec_from_dict(yaml.safe_load(text))
    validate(spec)
    cfg = json.loads((tmp_path / "spec.config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 2 and spec.tp == 2
    assert spec.precision == "bf16" and spec.architecture == str(tmp_path / "spec.config.json")
    # validation errors name the field and leave nothing behind
    bad = [f if f != train_assets["data"] else "/nope/data" for f in flags]
    assert (
        main(["train", "import-args", "-o", str(tmp_path / "bad.yaml"), "--allow-unmapped", "--", *bad]) == 2
    )
    assert "data path /nope/data.bin does not exist" in capsys.readouterr().err
    assert not (tmp_path / "bad.yaml").exists() and not (tmp_path / "bad.config.json").exists()


QWEN = (
    "dsw 0.5B 1 8 1e-5 1e-6 128 128 bf16 1 1 1 true true false false sel false 100 {data} {data} none "
    "1024000 10240 {out}"
)


def test_pai_qwen25_positional_arguments(tiny_tokenizer, tmp_path):
    imp = import_args(
        QWEN.format(data="/x/qwen_text_document", out=tmp_path).split(),
        tokenizer=str(tiny_tokenizer),
        world_size=8,
    )
    d = imp.doc
    assert imp.source == "pai-qwen2.5" and d["kind"] == "pretrain"
    assert (
        d["training"]["train_iters"] == 1024000 // 8 // 128
        and d["optimizer"]["lr_warmup_iters"] == 10240 // 8 // 128
    )
    assert d["parallel"]["data_parallel"] == 8 and d["training"]["recompute"] == "selective"
    assert d["optimizer"]["lr_decay_style"] == "cosine" and d["optimizer"]["weight_decay"] == 0.1
    assert d["checkpoint"]["save_dir"].startswith(str(tmp_path / "checkpoint"))
    cfg = imp.hf_config
    assert (
        cfg["architectures"],
        cfg["num_hidden_layers"],
        cfg["hidden_size"],
        cfg["num_key_value_heads"],
    ) == (["Qwen2ForCausalLM"], 24, 896, 2)
    sft = import_args(
        QWEN.replace(" false false sel", " false true sel").format(data="/x/q", out=tmp_path).split(),
        tokenizer=str(tiny_tokenizer),
    )
    assert (
        sft.doc["kind"] == "sft"
        and sft.doc["training"]["train_iters"] == 1024000
        and sft.doc["optimizer"]["lr_decay_iters"] == 1024000 - 10240
    )
    # SFT validates on the script's VALID_DATASET_PATH; pretraining says why it does not
    assert sft.doc["data"]["valid_paths"] == [{"prefix": "/x/q", "weight": 1.0}]
    assert "valid_paths" not in d["data"] and any(
        i.startswith("VALID_DATASET_PATH=") for i, _ in imp.no_effect
    )


def test_pai_layouts_refuse_what_they_cannot_run(tiny_tokenizer, tmp_path):
    with pytest.raises(InvalidArgument, match="takes 25 positional arguments"):
        import_args(QWEN.format(data="/x", out=tmp_path).split()[:-1], fmt="pai-qwen2.5")
    with pytest.raises(InvalidArgument, match="raw JSON: preprocess it first"):
        import_args(QWEN.format(data="/x/alpaca.json", out=tmp_path).split(), tokenizer=str(tiny_tokenizer))
    fp8 = import_args(
        QWEN.replace("bf16", "fp8").format(data="/x/d", out=tmp_path).split(), tokenizer=str(tiny_tokenizer)
    )
    assert ("PR=fp8", "fp8 training is not supported") in fp8.unmapped
    with pytest.raises(InvalidArgument, match="cannot tell the layout"):
        import_args(["dsw", "7B", "1"])


def test_pai_llama2_positional_arguments(tmp_path):
    args = (
        "dsw /workspace/Pai-Megatron-Patch 7B 1 8 1e-5 1e-6 2048 2048 0 bf16 2 1 sel true true true false "
        "100000 "
        f"/data/llama_text_document /data/llama2-7b-mcore 10000000000 100000000 {tmp_path}"
    ).split()
    imp = import_args(args)
    d = imp.doc
    assert imp.source == "pai-llama2" and d["model"]["init_from"] == "/data/llama2-7b-mcore"
    assert d["parallel"]["tensor_parallel"] == 2 and d["parallel"]["sequence_parallel"] is True
    assert (
        d["training"]["train_iters"] == 10000000000 // 8 // 2048
        and d["optimizer"]["lr_decay_style"] == "linear"
    )
    assert {i for i, _ in imp.no_effect} >= {"EXTRA_VOCAB_SIZE=0"}
    # attention kernels are never "no effect": TE=false means the local spec, so FL=true cannot apply
    assert d["training"]["transformer_impl"] == "local"
    said = dict(imp.mapped)
    assert "training.transformer_impl: local" in said["TE=false"] and "not used (TE=false)" in said["FL=true"]
    assert not {i for i, _ in imp.no_effect} & {"TE=false", "FL=true"}
    assert not imp.unmapped


def test_gpus_per_worker_follows_the_script_unless_told(tiny_tokenizer, tmp_path):
    args = QWEN.format(data="/x/q_text_document", out=tmp_path).split()
    assert (
        import_args(args, tokenizer=str(tiny_tokenizer)).doc["resources"]["gpus_per_worker"] == 1
    )  # Pai scripts are GPU-only
    cpu = import_args(args, tokenizer=str(tiny_tokenizer), gpus_per_worker=0)
    assert cpu.doc["resources"]["gpus_per_worker"] == 0
    assert [w for _, w in cpu.mapped if w.startswith("resources.gpus_per_worker")] == [
        "resources.gpus_per_worker: 0"
    ]
    with pytest.raises(InvalidArgument) as e:
        import_args(args, tokenizer=str(tiny_tokenizer), gpus_per_worker=-1)
    assert e.value.field == "gpus_per_worker"


def test_a_cluster_that_cannot_hold_the_job_is_named_not_waited_for():
    from services.trainer.ray_driver import unfit_reason

    cpu_only = {"CPU": 2.0, "memory": 1e10}
    why = unfit_reason({"CPU": 1, "GPU": 1}, 1, cpu_only)
    assert "0 GPU in all" in why and "resources.gpus_per_worker" in why
    assert "resources.cpus_per_worker" in unfit_reason({"CPU": 1}, 4, cpu_only)
    assert unfit_reason({"CPU": 1}, 2, cpu_only) == ""
    assert unfit_reason({"CPU": 1, "GPU": 1}, 8, {"CPU": 64, "GPU": 8}) == ""


def test_async_save_maps_to_the_spec(bpe, tmp_path):
    imp = import_args(
        split_command_text(GPT2_345M.format(data="d", bpe=bpe, save=tmp_path)) + ["--async-save"]
    )
    assert imp.doc["checkpoint"]["async_save"] is True and "--async-save" in dict(imp.mapped)


MIXTRAL = """
torchrun --nproc_per_node 4 pretrain_gpt.py --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \\
    --expert-model-parallel-size 2 --num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 14336 \\
    --moe-aux-loss-coeff 1e-2 --moe-router-load-balancing-type aux_loss \\
    --moe-token-dispatcher-type alltoall \\
    --moe-grouped-gemm --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 \\
    --group-query-attention --num-query-groups 8 --swiglu --disable-bias-linear --normalization RMSNorm \\
    --position-embedding-type rope --untie-embeddings-and-output-weights --max-position-embeddings 4096 \\
    --vocab-size 32000 --seq-length 4096 --micro-batch-size 1 --global-batch-size 8 --train-iters 100 --bf16
"""  # the shape of Megatron-LM's examples/mixtral script


def test_megatron_moe_flags_become_expert_parallel_and_a_mixtral(tmp_path):
    imp = import_args(split_command_text(MIXTRAL))
    d = imp.doc
    assert d["parallel"]["expert_parallel"] == 2 and d["parallel"]["data_parallel"] == 4
    assert d["training"]["moe_aux_loss_coeff"] == 0.01 and d["training"]["moe_grouped_gemm"] is True
    cfg = imp.hf_config
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 8
    assert cfg["num_experts_per_tok"] == 2 and cfg["intermediate_size"] == 14336
    assert not imp.unmapped
    assert "--moe-token-dispatcher-type alltoall" in dict(imp.no_effect)
    capped = import_args(split_command_text(MIXTRAL) + ["--moe-expert-capacity-factor", "1.25"])
    assert capped.doc["training"]["moe_capacity_factor"] == 1.25 and not capped.unmapped
    other = import_args(split_command_text(MIXTRAL) + ["--moe-token-drop-policy", "position"])
    assert any(item.startswith("--moe-token-drop-policy") for item, _ in other.unmapped)


def test_qwen_moe_flags_with_a_gated_shared_expert_become_a_qwen2_moe():
    flags = MIXTRAL.replace("--moe-grouped-gemm", "--add-qkv-bias --moe-use-shared-expert-gate")
    flags += (
        " --moe-shared-expert-intermediate-size 20480 --moe-router-pre-softmax --moe-layer-freq '([1]*32)'"
    )
    imp = import_args(split_command_text(flags))
    cfg = imp.hf_config
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["shared_expert_intermediate_size"] == 20480
    assert cfg["norm_topk_prob"] is False and not imp.unmapped
    mixed = import_args(split_command_text(MIXTRAL) + ["--moe-layer-freq", "2"])
    assert any(item.startswith("--moe-layer-freq") for item, _ in mixed.unmapped)


QWEN3 = (
    "dsw {size} 1 8 1e-5 1e-6 128 128 bf16 1 1 1 {etp} 2 true true true false sel false 100000 "
    "{data} {data} none 1024000 10240 {out}"
)  # examples/qwen3/run_mcore_qwen3.sh's 27 positional arguments (CP, ETP, EP after TP and PP)


def test_pai_qwen3_positional_arguments_with_expert_parallelism(tiny_tokenizer, tmp_path):
    imp = import_args(
        QWEN3.format(size="A3B", etp=1, data="/x/q_text_document", out=tmp_path).split(),
        tokenizer=str(tiny_tokenizer),
        world_size=4,
    )
    d = imp.doc
    assert imp.source == "pai-qwen3" and d["parallel"]["expert_parallel"] == 2
    assert d["parallel"]["data_parallel"] == 4 and d["training"]["moe_aux_loss_coeff"] == 0.001
    assert d["training"]["moe_grouped_gemm"] is True and d["optimizer"]["weight_decay"] == 0.01
    cfg = imp.hf_config
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_experts"] == 128
    assert (cfg["num_experts_per_tok"], cfg["moe_intermediate_size"], cfg["head_dim"]) == (8, 768, 128)
    assert cfg["norm_topk_prob"] is True and not imp.unmapped
    other_etp = import_args(
        QWEN3.format(size="A3B", etp=2, data="/x/q", out=tmp_path).split(), tokenizer=str(tiny_tokenizer)
    )
    assert any(item == "ETP=2" for item, _ in other_etp.unmapped)  # ETP != TP: not supported
    dense = import_args(
        QWEN3.format(size="0.6B", etp=1, data="/x/q", out=tmp_path).split(), tokenizer=str(tiny_tokenizer)
    )
    assert dense.hf_config["architectures"] == [
        "Qwen3ForCausalLM"
    ] and "expert_parallel" not in dense.doc.get("parallel", {})
    assert any(item.startswith("ETP=1 EP=2") for item, _ in dense.no_effect)
