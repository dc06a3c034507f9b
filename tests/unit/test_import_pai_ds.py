"""`megastack train import-args` for Pai's HF + DeepSpeed flow: run_ds_train_huggingface_llama.sh's positional
arguments and ds_train_huggingface_llama.py's flags -> an hf-deepspeed spec."""

from __future__ import annotations

import pytest
import yaml

from services.trainer.spec import validate
from services.trainer.wire import spec_from_dict
from shared.errors import InvalidArgument
from tools.cli.import_args import import_args
from tools.cli.main import main

# the guide's example, with this machine's tiny model and records in place of Llama-2-7b and wudao
GUIDE = "dsw 7B 1 2 1e-5 64 bf16 2 true {train} {valid} {hf} 2 {out}"


def _accounted(imp, tokens) -> None:
    """Every positional argument appears in exactly one of the three lists."""
    items = [i for i, _ in (*imp.mapped, *imp.no_effect, *imp.unmapped)]
    for name in ("ENV", "MODEL_SIZE", "PR", "ZERO", "GC", "TRAIN_DATASET_PATH", "EPOCH", "OUTPUT_BASEPATH"):
        assert sum(i.startswith(name + "=") for i in items) == 1, (name, items)


def test_the_guides_14_arguments_become_an_hf_deepspeed_spec(instruction_assets, tmp_path, capsys):
    a = instruction_assets
    tokens = GUIDE.format(train=a["train"], valid=a["valid"], hf=a["hf"], out=tmp_path / "out").split()
    imp = import_args(tokens, world_size=2, gpus_per_worker=0)
    assert imp.source == "pai-ds-llama" and not imp.unmapped
    _accounted(imp, tokens)
    d = imp.doc
    assert d["kind"] == "hf-deepspeed" and d["deepspeed"] == {"zero_stage": 2}
    assert d["training"] == {
        "micro_batch_size": 1,
        "global_batch_size": 4,  # BATCH_SIZE 1 x GA_STEPS 2 x 2 ranks
        "epochs": 2,
        "precision": "bf16",
        "recompute": "full",  # GC=true
    }
    assert d["data"]["files"] == [str(a["train"])] and d["model"]["hf_model"] == str(a["hf"])
    assert d["checkpoint"]["export_hf_dir"].endswith("/hf/pai-ds-llama-7b")
    # through the CLI: a spec file that validates here (ranks on CPU: gpus_per_worker 0)
    out = tmp_path / "spec.yaml"
    assert (
        main(
            [
                "train",
                "import-args",
                "-o",
                str(out),
                "--world-size",
                "2",
                "--gpus-per-worker",
                "0",
                "--",
                *tokens,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "read a pai-ds-llama command line" in printed and "ZERO=2  ->  deepspeed.zero_stage: 2" in printed
    spec = spec_from_dict(yaml.safe_load(out.read_text()))
    validate(spec)
    assert spec.kind == "hf-deepspeed" and spec.dp == 2 and spec.zero_stage == 2 and spec.epochs == 2
    # the script's 15-argument form (FLASH after GC) reads the same, FLASH without effect
    fifteen = tokens[:9] + ["true"] + tokens[9:]
    imp15 = import_args(fifteen, world_size=2)
    assert imp15.doc["deepspeed"] == d["deepspeed"] and any(
        i.startswith("FLASH=") for i, _ in imp15.no_effect
    )


def test_the_python_scripts_flags(instruction_assets, tmp_path):
    a = instruction_assets
    flags = (
        "torchrun --nproc_per_node 2 ds_train_huggingface_llama.py "
        f"--load {a['hf']} --save {tmp_path / 'ck'} "
        f"--train-data {a['train']} --valid-data {a['valid']} --num-layers 32 --hidden-size 4096 "
        "--seq-length 64 --num-attention-heads 32 --intermediate-size 11008 --micro-batch-size 2 --epochs 1 "
        "--lr 1e-5 --num-workers 1 --gradient-accumulation-steps 2 --logging-dir /tmp/logs --flash true "
        "--bf16 "
        "--enable-gradient-checkpointing --zero-stage 3 --warmup-ratio 0.03"
    ).split()
    imp = import_args(flags, gpus_per_worker=0)  # the world size from torchrun's --nproc_per_node
    assert imp.source == "pai-ds-flags"
    assert imp.unmapped == [
        ("--warmup-ratio 0.03", "not a flag of ds_train_huggingface_llama.py megastack knows")
    ]
    d = imp.doc
    assert d["deepspeed"]["zero_stage"] == 3 and d["training"]["global_batch_size"] == 8
    assert d["training"]["recompute"] == "full" and d["training"]["precision"] == "bf16"
    no_effect = " ".join(i for i, _ in imp.no_effect)
    assert (
        "--num-layers 32" in no_effect
        and "--logging-dir /tmp/logs" in no_effect
        and "--flash true" in no_effect
    )
    validate(spec_from_dict(d))


def test_what_cannot_be_read_is_an_error_naming_it(instruction_assets, tmp_path):
    a = instruction_assets
    tokens = GUIDE.format(train=a["train"], valid=a["valid"], hf=a["hf"], out=tmp_path).split()
    for bad, fragment in (
        (["dlc", *tokens[1:]], "pass --world-size"),
        ([*tokens[:7], "4", *tokens[8:]], "ZERO must be 1, 2 or 3"),
        ([*tokens[:8], "yes", *tokens[9:]], "GC must be true or false"),
        ([*tokens[:9], str(tmp_path), *tokens[10:]], "holds no .json or .jsonl files"),
    ):
        with pytest.raises(InvalidArgument, match=fragment) as e:
            import_args(bad)
        assert e.value.field == "args"
    with pytest.raises(InvalidArgument, match="needs --save"):
        import_args(["--load", str(a["hf"]), "--train-data", str(a["train"])], "pai-ds-flags")
