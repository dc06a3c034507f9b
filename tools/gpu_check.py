# Over 600 lines on purpose: a GPU session gets one file to run in one command, its checks in order.
"""One short run that proves megastack's GPU code paths, on the machine it runs on.

    python tools/gpu_check.py                    # on a GPU machine: --device cuda
    python tools/gpu_check.py --device cpu       # the same checks on the CPU (make test runs this, shorter)

No Ray and no services: it calls the code paths directly, on tiny random models built here (offline)
and on the default SmolLM2 when ``models/`` holds it. Checks:

- ``textgen[<dtype>]``: the serving engine on the device (float32 and bfloat16): greedy tokens equal HF
  ``generate()`` on the same device and dtype (compared up to the first near-tie of HF's top-2 logits,
  where either choice is right; in float32 there must be none); a seeded sampled request is
  reproducible; 16 concurrent sequences each equal their solo run (float32); a cancelled sequence
  frees its slot; a fault injected into one sequence's decode fails it alone.
- ``textgen_smollm2``: greedy tokens of the default model equal HF ``generate()`` (bfloat16 on a GPU).
- ``converter_verify``: ``convert --verify`` HF -> torch_dist, the Megatron side built on megatron-core's
device.
- ``training``: megatron-core under ``torchrun --nproc_per_node 1`` (bf16 on a GPU): the loss falls over
  ``--steps`` steps; a run resumed from the middle checkpoint repeats the second half of the curve; one
  neat-packed SFT step (explicit mask, per-sample RoPE positions); the Transformer Engine spec when
``transformer_engine`` imports (else reported as skipped).
- ``evaluator_scores``: the prompt log-probs the evaluator asks for (``max_new_tokens=0``,
  ``prompt_logprobs_from``) computed on the device equal the CPU float32 scores within 1e-3.

Writes one JSON report (each check: passed, figures, seconds, error) to ``--out`` (default
``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``gpu_check.json``); exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPTS = [
    "The old man looked at the river",
    "He said that the bridge",
    "Water came down the long road",
    "She knew the house was dark and",
]


class Check:
    """One named check: its figures, and a failure list that makes it fail."""

    def __init__(self, name: str) -> None:
        self.name, self.figures, self.failures = name, {}, []
        self.t0 = time.perf_counter()

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def report(self, error: str | None = None, skipped: str | None = None) -> dict[str, Any]:
        out = {
            "name": self.name,
            "passed": skipped is None and error is None and not self.failures,
            "seconds": round(time.perf_counter() - self.t0, 2),
            "figures": self.figures,
        }
        if self.failures:
            out["failures"] = self.failures
        if error:
            out["error"] = error
        if skipped:
            out["skipped"] = skipped
            out["passed"] = None
        return out


# -- assets (tiny, offline) ------------------------------------------------------------------------
def make_assets(root: Path) -> dict[str, Path]:
    from tools.tiny import make_tiny_hf, synthetic_lines, train_tokenizer

    tok = train_tokenizer(root / "tok", lines=synthetic_lines(2000))
    llama = make_tiny_hf("llama", root / "llama", tok, num_hidden_layers=4)
    return {"tok": tok, "llama": llama, "mixtral": make_tiny_hf("mixtral", root / "mixtral", tok)}


# -- textgen ----------------------------------------------------------------------------------------
def _served(model_dir: Path, device: str, dtype: str, batch: int = 16):
    from services.textgen.api import TextgenConfig, load_served_model

    s = load_served_model(
        TextgenConfig(
            model_dir=model_dir,
            device=device,
            dtype=dtype,
            max_batch_size=batch,
            max_queue_size=64,
            max_prompts_per_request=32,
            max_context_tokens=256,
            port=0,
            metrics_port=0,
        )
    )
    s.engine.start()
    return s


def _greedy(ids, n: int, **kw):
    from services.textgen.api import SamplingSpec, SequenceRequest, StopSpec

    return SequenceRequest(
        prompt_ids=tuple(ids),
        sampling=SamplingSpec(greedy=True),
        stopping=StopSpec(max_new_tokens=n, ignore_eos=True),
        **kw,
    )


def hf_greedy(
    model_dir: Path, prompts: list[list[int]], n: int, device: str, dtype: torch.dtype
) -> list[tuple[list[int], list[float]]]:
    """HF generate() tokens and, per step, the gap between its top-2 logits (a near tie may go either way)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.pad_token_id = None, 0  # never stop early: the engine side ignores EOS too
    config.temperature = config.top_p = config.top_k = None
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], dtype=torch.long, device=device)
            g = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                generation_config=config,
            )
            gaps = [float((lambda t: t[0] - t[1])(torch.topk(sc[0].float(), 2).values)) for sc in g.scores]
            out.append((g.sequences[0, len(ids) :].tolist(), gaps))
    del model
    return out


def compare_greedy(
    ours: list[list[int]], theirs: list[tuple[list[int], list[float]]], tie: float
) -> dict[str, Any]:
    """Positions compared (up to the first HF near-tie, gap < ``tie``) and how many of those agree."""
    compared = agree = cut = 0
    for mine, (ref, gaps) in zip(ours, theirs):
        for i, (a, b) in enumerate(zip(mine, ref)):
            if gaps[i] < tie:
                cut += 1
                break
            compared += 1
            if a != b:
                break
            agree += 1
    return {"compared_tokens": compared, "agreeing_tokens": agree, "cut_at_near_tie": cut}


def check_textgen(c: Check, assets: dict, device: str, dtype: str) -> None:
    from llm.devices import resolve_dtype
    from services.textgen.api import CANCELLED, ERROR, LENGTH, SamplingSpec, SequenceRequest, StopSpec

    s = _served(assets["llama"], device, dtype)
    try:
        c.figures["model_device"] = str(s.model.device)
        c.expect(
            torch.device(s.model.device).type == torch.device(device).type,
            f"model on {s.model.device}, not {device}",
        )
        prompts = [s.tokenizer.encode(p) for p in PROMPTS]
        n = 16
        ours = [h.result().token_ids for h in s.engine.submit([_greedy(p, n) for p in prompts])]
        ref = hf_greedy(assets["llama"], prompts, n, device, resolve_dtype(dtype))
        tie = 0.0 if dtype == "float32" else 0.05
        cmp = compare_greedy(ours, ref, tie)
        c.figures["greedy_vs_hf"] = cmp
        c.expect(
            cmp["agreeing_tokens"] == cmp["compared_tokens"]
            and cmp["compared_tokens"] >= (len(prompts) * n if tie == 0 else 4),
            f"greedy tokens differ from HF generate(): {cmp}",
        )
        # seeded sampling: reproducible, per sequence
        sampled = SequenceRequest(
            prompt_ids=tuple(prompts[0]),
            sampling=SamplingSpec(temperature=1.0, top_p=0.95, seed=1234),
            stopping=StopSpec(max_new_tokens=n, ignore_eos=True),
        )
        runs = [h.result().token_ids for h in s.engine.submit([sampled, sampled])] + [
            s.engine.submit([sampled])[0].result().token_ids
        ]
        c.figures["seeded_sample_reproducible"] = runs[0] == runs[1] == runs[2]
        c.expect(
            c.figures["seeded_sample_reproducible"] and len(runs[0]) == n, f"seeded samples differ: {runs}"
        )
        # 16 concurrent sequences, each equal to its solo run
        many = [s.tokenizer.encode(f"{PROMPTS[i % 4]} {i}") for i in range(16)]
        solo = [s.engine.submit([_greedy(p, 12)])[0].result().token_ids for p in many]
        t0 = time.perf_counter()
        results = [h.result() for h in s.engine.submit([_greedy(p, 12) for p in many])]
        c.figures["concurrent_16_s"] = round(time.perf_counter() - t0, 3)
        same = sum(r.token_ids == t for r, t in zip(results, solo))
        c.figures["concurrent_16_equal_to_solo"] = same
        c.expect(
            all(r.finish_reason == LENGTH and len(r.token_ids) == 12 for r in results),
            "a concurrent sequence did not finish",
        )
        c.expect(
            same == 16 or dtype != "float32",
            f"only {same}/16 batched sequences equal their solo run in float32",
        )
        # a cancelled sequence frees its slot
        h = s.engine.submit([_greedy(prompts[0], 200)])[0]
        events = h.events()
        next(events)
        h.cancel()
        last = list(events)[-1]
        _wait_idle(s.engine)
        c.figures["cancel_frees_slot"] = (
            last.finish_reason == CANCELLED and s.engine.pool.num_free() == s.engine.pool.usable
        )
        c.expect(
            c.figures["cancel_frees_slot"],
            f"cancel: {last.finish_reason}, free blocks {s.engine.pool.num_free()}/{s.engine.pool.usable}",
        )
        # a fault in one sequence's decode fails it alone
        real, poison_len = s.model.decode, 60

        def decode(tokens, positions, tables, cache):
            if int(positions.max()) >= poison_len:
                raise RuntimeError("injected decode fault")
            return real(tokens, positions, tables, cache)

        s.model.decode = decode
        try:
            good = s.engine.submit([_greedy(p, n) for p in prompts])
            bad = s.engine.submit([_greedy(list(range(3, 3 + poison_len)), n)])[0]
            done = [g.result() for g in good]
            failed = bad.result()
        finally:
            s.model.decode = real
        res = [r.token_ids for r in done]
        # the others finish whole; in float32 with the same tokens (their passes are re-run alone after the
        # failed group pass, and only float32 is token-exact across batch compositions, as above)
        whole = all(r.finish_reason == LENGTH and len(r.token_ids) == n for r in done)
        c.figures["fault_fails_alone"] = failed.finish_reason == ERROR and whole
        c.figures["fault_others_equal"] = sum(a == b for a, b in zip(res, ours))
        c.expect(
            c.figures["fault_fails_alone"] and (res == ours or dtype != "float32"),
            f"fault containment: {failed.finish_reason}, others whole: {whole}, equal: {res == ours}",
        )
        _wait_idle(s.engine)
        # structured output: the token mask travels to the device of the logits
        from protos.textgen.v1 import textgen_pb2 as tpb
        from services.textgen.api import Constraints

        choices = ["alpha-7", "beta-3"]
        index = Constraints(s.tokenizer, s.model.out_w.shape[0]).index(
            tpb.Guided(choice=tpb.Choices(values=choices))
        )
        guided = SequenceRequest(
            prompt_ids=tuple(prompts[0]),
            sampling=SamplingSpec(greedy=True),
            stopping=StopSpec(max_new_tokens=24),
            guide_index=index,
        )
        text = s.tokenizer.decode(s.engine.submit([guided])[0].result().token_ids).replace(
            s.tokenizer.eos_token, ""
        )
        c.figures["structured_output"] = text in choices
        c.expect(text in choices, f"structured output {text!r} is not one of {choices}")
    finally:
        s.engine.stop()


def _wait_idle(engine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)


def check_smollm2(c: Check, device: str) -> str | None:
    from shared.paths import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        return (
            f"{DEFAULT_MODEL_DIR} is not here (make setup prepares it; it is too large to travel to a GPU "
            "machine)"
        )
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    s = _served(DEFAULT_MODEL_DIR, device, dtype, batch=4)
    try:
        prompts = [s.tokenizer.encode(p) for p in PROMPTS]
        ours = [h.result().token_ids for h in s.engine.submit([_greedy(p, 16) for p in prompts])]
        t_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    finally:
        s.engine.stop()
    cmp = compare_greedy(
        ours, hf_greedy(DEFAULT_MODEL_DIR, prompts, 16, device, t_dtype), 0.0 if dtype == "float32" else 0.05
    )
    c.figures.update(dtype=dtype, greedy_vs_hf=cmp)
    c.expect(
        cmp["agreeing_tokens"] == cmp["compared_tokens"] and cmp["compared_tokens"] >= 8,
        f"greedy differs from HF: {cmp}",
    )
    return None


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


def check_moe(c: Check, assets: dict, work: Path, device: str) -> None:
    """A tiny Mixtral: megatron-core's MoE layers on the device (Transformer Engine's spec where it imports)
    load the converter's torch_dist with HF's logits, and textgen's MoE layers generate HF's greedy tokens."""
    from services.converter.api import ConvertSpec, convert

    r = convert(
        ConvertSpec(
            load_dir=assets["mixtral"], save_dir=work / "moe-mcore", target_format="mcore", verify=True
        )
    )
    c.figures["converter"] = {k: r.parity.get(k) for k in ("max_abs_logit_diff", "top1_agreement")}
    c.expect(
        r.parity["max_abs_logit_diff"] < 1e-3 and r.parity["top1_agreement"] == 1.0, f"parity: {r.parity}"
    )
    s = _served(assets["mixtral"], device, "float32")
    try:
        prompts = [s.tokenizer.encode(p) for p in PROMPTS]
        ours = [h.result().token_ids for h in s.engine.submit([_greedy(p, 12) for p in prompts])]
    finally:
        s.engine.stop()
    cmp = compare_greedy(ours, hf_greedy(assets["mixtral"], prompts, 12, device, torch.float32), 0.0)
    c.figures["greedy_vs_hf"] = cmp
    # (HF's generate() ends a sequence at the tiny model's EOS; the engine, told to ignore EOS, goes on: the
    # tokens are compared up to HF's end)
    c.expect(cmp["agreeing_tokens"] == cmp["compared_tokens"] >= 24, f"greedy tokens differ from HF: {cmp}")


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


# -- evaluator scoring ------------------------------------------------------------------------------
def check_scores(c: Check, assets: dict, device: str) -> None:
    """The evaluator's loglikelihood requests (max_new_tokens=0, prompt log-probs from the continuation)
    scored by an engine on ``device`` and by one on the CPU in float32."""
    pairs = [
        ("The old man looked at the", " river"),
        ("He said that the", " bridge would not last"),
        ("Water came down", " the long road"),
        ("She knew the house", " was dark"),
    ]

    def scores(dev: str) -> list[list[float]]:
        s = _served(assets["llama"], dev, "float32", batch=8)
        try:
            reqs = []
            for ctx, cont in pairs:
                a, b = s.tokenizer.encode(ctx), s.tokenizer.encode(ctx + cont)
                reqs.append(_greedy(b, 0, prompt_logprobs=True, top_logprobs=1, prompt_logprobs_from=len(a)))
            return [h.result().prompt_logprobs for h in s.engine.submit(reqs)]
        finally:
            s.engine.stop()

    here, cpu = scores(device), scores("cpu")
    diff = max(abs(x - y) for a, b in zip(here, cpu) for x, y in zip(a, b))
    c.figures.update(requests=len(pairs), positions=sum(len(a) for a in here), max_abs_logprob_diff=diff)
    c.expect(
        all(len(a) == len(b) > 0 for a, b in zip(here, cpu)) and diff <= 1e-3,
        f"scores differ from the CPU by {diff}",
    )


# -- driver -----------------------------------------------------------------------------------------
CHECKS = ("textgen", "textgen_smollm2", "converter_verify", "moe", "training", "evaluator_scores")


def environment(device: str) -> dict[str, Any]:
    env = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    try:
        import megatron.core

        env["megatron_core"] = megatron.core.__version__
    except Exception as e:  # noqa: BLE001 - reported, the checks that need it fail on their own
        env["megatron_core"] = f"missing ({type(e).__name__})"
    return env


def run_checks(
    device: str, only: tuple[str, ...], steps: int, dtypes: tuple[str, ...], precision: str, work: Path
) -> list[dict]:
    assets = make_assets(work / "assets")
    plan = []
    if "textgen" in only:
        plan += [(f"textgen[{d}]", lambda c, d=d: check_textgen(c, assets, device, d)) for d in dtypes]
    if "textgen_smollm2" in only:
        plan.append(("textgen_smollm2", lambda c: check_smollm2(c, device)))
    if "converter_verify" in only:
        plan.append(("converter_verify", lambda c: check_converter(c, assets, work)))
    if "moe" in only:
        plan.append(("moe", lambda c: check_moe(c, assets, work, device)))
    if "training" in only:
        plan.append(("training", lambda c: check_training(c, assets, work, device, steps, precision)))
    if "evaluator_scores" in only:
        plan.append(("evaluator_scores", lambda c: check_scores(c, assets, device)))
    out = []
    for name, fn in plan:
        c = Check(name)
        print(f"[gpu_check] {name} ...", flush=True)  # noqa: T201
        try:
            skipped = fn(c)
            out.append(c.report(skipped=skipped if isinstance(skipped, str) else None))
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            out.append(c.report(error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2500:]}"))
        r = out[-1]
        state = "skipped" if r["passed"] is None else ("passed" if r["passed"] else "FAILED")
        print(f"[gpu_check] {name}: {state} in {r['seconds']}s {json.dumps(r['figures'])}", flush=True)  # noqa: T201
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Checks: " + ", ".join(CHECKS),
    )
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (default when present) or cpu",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report path (default $OUT/gpu_check.json, else ./gpu_check.json)",
    )
    ap.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks to run (default: all)")
    ap.add_argument(
        "--steps", type=int, default=30, help="training steps (the resume check restarts at half)"
    )
    ap.add_argument("--dtypes", default="float32,bfloat16", help="textgen dtypes")
    ap.add_argument(
        "--precision", default="bf16", choices=("bf16", "fp32"), help="training precision (default bf16)"
    )
    ap.add_argument(
        "--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one, removed after)"
    )
    a = ap.parse_args(argv)
    only = tuple(x for x in a.only.split(",") if x)
    unknown = set(only) - set(CHECKS)
    if unknown:
        ap.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    if a.steps < 4 or a.steps % 2:
        ap.error("--steps must be an even number >= 4")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available here (use --device cpu)")
    out_path = a.out or (
        Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    tmp = None if a.work_dir else tempfile.TemporaryDirectory(prefix="gpu-check-")
    work = a.work_dir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        checks = run_checks(a.device, only, a.steps, tuple(a.dtypes.split(",")), a.precision, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    failed = [c["name"] for c in checks if c["passed"] is False]
    report = {
        "environment": environment(a.device),
        "passed": not failed,
        "failed": failed,
        "seconds": round(time.perf_counter() - t0, 1),
        "checks": checks,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    print(
        f"[gpu_check] {'PASSED' if not failed else 'FAILED: ' + ', '.join(failed)} in {report['seconds']}s; "
        ""  # noqa: T201
        f"report: {out_path}",
        flush=True,
    )
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
