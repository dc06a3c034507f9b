"""gpu_check's training checks: ``convert --verify`` (HF -> torch_dist parity) and megatron-core training
under torchrun (the loss falls, a resumed run repeats the curve, a neat-packed SFT step, Transformer Engine's
spec)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tools.gpu_checks import Check


# -- converter --------------------------------------------------------------------------------------
def check_converter(c: Check, assets: dict, work: Path) -> None:
    from llm.mcore.model import megatron_device
    from services.converter.api import ConvertSpec, convert

    r = convert(
        ConvertSpec(
            load_dir=assets["llama"], save_dir=work / "conv-mcore", target_format="mcore", verify=True
        )
    )
    c.figures.update(
        megatron_device=str(megatron_device()),
        **{k: r.parity.get(k) for k in ("max_abs_logit_diff", "top1_agreement", "weights_exact")},
    )
    c.expect(
        r.parity["max_abs_logit_diff"] < 1e-3 and r.parity["top1_agreement"] == 1.0, f"parity: {r.parity}"
    )


# -- training ---------------------------------------------------------------------------------------
def training_assets(assets: dict, work: Path) -> dict[str, Any]:
    from services.converter.api import ConvertSpec, convert
    from tools.preprocess.pipeline import Options, run
    from tools.tiny import synthetic_lines

    mcore = work / "train-init"
    if not mcore.exists():
        convert(ConvertSpec(load_dir=assets["llama"], save_dir=mcore, target_format="mcore"))
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_lines(3000, seed=1)))
    run(
        Options(
            input=corpus,
            output_prefix=str(work / "data"),
            tokenizer_name_or_path=assets["tok"],
            append_eod=True,
        )
    )
    rows = [
        {"instruction": f"Say {w} twice.", "input": "", "output": f"{w} {w}"}
        for w in synthetic_lines(64, seed=2)
    ]
    sft = work / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(
        Options(
            input=sft,
            output_prefix=str(work / "sft"),
            tokenizer_name_or_path=assets["tok"],
            handler_name="AlpacaStyleInstructionHandler",
            seq_length=128,
            pack=True,
            neat_pack=True,
        )
    )
    return {"mcore": mcore, "data": str(work / "data_text_document"), "sft": str(work / "sft")}


def _spec(t: dict, save_dir: Path, device: str, steps: int, precision: str, **over):
    """A TrainSpec built directly (no generated protobuf code is needed on the GPU machine), validated."""
    from services.trainer.api import TrainSpec, validate

    gpu = device.startswith("cuda")
    fields = dict(
        name="gpu-check",
        kind="pretrain",
        init_from=str(t["mcore"]),
        data_paths=((t["data"], 1.0),),
        seq_length=128,
        lr=0.003,
        lr_warmup_iters=min(2, steps - 1),
        lr_decay_iters=steps,
        micro_batch_size=4,
        global_batch_size=8,
        train_iters=steps,
        log_interval=1,
        precision=precision,
        save_dir=str(save_dir),
        save_interval=steps // 2,
        gpus_per_worker=1 if gpu else 0,
        cpus_per_worker=2,
    )
    spec = TrainSpec(**{**fields, **over})
    validate(spec)
    return spec


def _train(spec, timeout_s: float = 300) -> dict[int, dict]:
    from services.trainer.api import run_local

    r = run_local(spec, 1, timeout_s=timeout_s)
    if r.returncode:
        raise RuntimeError(f"torchrun exited {r.returncode}:\n{r.log[-3000:]}")
    rows = [json.loads(x) for x in (Path(spec.save_dir) / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x for x in rows if not x.get("done")}


def check_training(c: Check, assets: dict, work: Path, device: str, steps: int, precision: str) -> None:
    from llm.mcore.model import transformer_engine_status

    t = training_assets(assets, work)
    spec = _spec(t, work / "run-a", device, steps, precision)
    c.figures["precision"] = spec.precision
    a = _train(spec)
    losses = [a[s]["loss"] for s in sorted(a)]
    k = max(2, steps // 6)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    c.figures.update(
        steps=len(losses),
        loss_first=round(first, 4),
        loss_last=round(last, 4),
        tokens_per_s=round(a[steps]["tokens_per_s"], 1),
        step_time_s=round(a[steps]["step_time_s"], 4),
    )
    c.expect(
        sorted(a) == list(range(1, steps + 1)) and last < first - 0.1,
        f"the loss did not fall: {first:.3f} -> {last:.3f}",
    )
    # resume: a copy of run A as it stood after the middle checkpoint, resumed to the end
    half = steps // 2
    b_dir = work / "run-b"
    shutil.copytree(work / "run-a", b_dir, ignore=shutil.ignore_patterns(f"iter_{steps:07d}", "tensorboard"))
    (b_dir / "latest_checkpointed_iteration.txt").write_text(str(half))
    (b_dir / "metrics.jsonl").unlink()
    b = _train(_spec(t, b_dir, device, steps, precision))
    diffs = [
        abs(b[s]["loss"] - a[s]["loss"]) / abs(a[s]["loss"]) for s in range(half + 1, steps + 1) if s in b
    ]
    tol = (
        0.0 if device == "cpu" else 2e-3
    )  # GPU kernels (atomics in the embedding backward) are not bitwise deterministic
    c.figures.update(
        resumed_from=half, resumed_steps=len(diffs), resume_max_rel_diff=max(diffs) if diffs else None
    )
    c.expect(
        sorted(b) == list(range(half + 1, steps + 1)) and max(diffs) <= tol,
        f"the resumed curve differs (max rel {max(diffs) if diffs else None}, tolerance {tol})",
    )
    # one packed-SFT step
    sft = _train(
        _spec(
            t,
            work / "run-sft",
            device,
            2,
            precision,
            kind="sft",
            data_paths=((t["sft"], 1.0),),
            save_interval=0,
        )
    )
    c.figures["sft_loss"] = round(sft[2]["loss"], 4)
    c.expect(sorted(sft) == [1, 2] and sft[2]["loss"] == sft[2]["loss"], "neat-packed SFT steps did not run")
    usable, why = transformer_engine_status()
    c.figures["transformer_engine"] = why
    if usable:
        te = _train(
            _spec(
                t,
                work / "run-te",
                device,
                10,
                precision,
                transformer_impl="transformer_engine",
                save_interval=0,
            )
        )
        c.figures["te_loss_first_last"] = [round(te[1]["loss"], 4), round(te[10]["loss"], 4)]
        c.expect(te[10]["loss"] < te[1]["loss"], "the Transformer Engine run's loss did not fall")
