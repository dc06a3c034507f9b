"""gpu_check's serving checks: the textgen engine on the device against HF, the default model, a tiny
MoE through megatron-core and textgen, and the evaluator's prompt log-probs against the CPU's."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from tools.gpu_checks import Check

PROMPTS = [
    "The old man looked at the river",
    "He said that the bridge",
    "Water came down the long road",
    "She knew the house was dark and",
]


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
