"""Serving benchmark: HF generate() (one at a time; one static batch) vs. megastack through the gateway.

    python tools/bench/textgen.py [--requests 16] [--new-tokens 64] [--dtype float32]

Same prompts (32 tokens each, cut from the shipped prose corpus), same model (the default
SmolLM2-135M), same machine, one script:
(a) baselines: HF ``model.generate()`` serving the requests one at a time (what Megatron's global lock
    gives), greedy, exactly ``--new-tokens`` tokens each; and HF ``generate()`` over all of them as one
    static batch (no padding: the prompts are of one length);
(b) megastack: the real stack (textgen + gateway processes, default settings), ``--requests`` streaming
    ``/v1/completions`` calls from 1 and 4 concurrent clients, then 3 rounds of 16 clients and 64 clients
    over 64 prompts back to back (each level's median run reported); and the cost of a structured-output
    mask on every token at 16 clients (3 back-to-back pairs, masked and not);
(c) the paged cache's workloads, each against the same stack with the feature turned off:
    - shared prefix: 16 requests from 16 clients, each a 1,000-token shared prefix + 16 tokens of its
      own, 16 new tokens; prefix caching on vs off (``MEGASTACK_TEXTGEN_PREFIX_CACHING=false``);
    - long prompt arrival: the inter-token latency p99 of 8 running streams, alone and while a
      1,500-token prompt arrives; chunked prefill on (default) vs off (one chunk of everything);
(d) the decode step in process (``tools/bench/decode_step.py``): ms per step at 1 and 16 sequences,
    composed with ``F.linear``, composed with the compiled kernels, and in one compiled call as the engine
    runs it, float32 and bfloat16, against the memory-bandwidth
    roofline measured in the same run; issue 18's per-token targets (<= 20 ms float32, <= 12 ms bfloat16);
(e) the engines users would pick instead, where installed beside the project (tools/bench/baselines.py
    says how; the bench installs nothing): vLLM's CPU engine and llama.cpp's llama-server, same client,
    same prompts, 1, 4 and 16 clients, after megastack's runs.
Reported: generated tokens/s, p50/p99 time to first token and inter-token latency, ratios to (a).
Targets: 16 clients >= 4x the sequential baseline's tokens/s, >= 1.5x the static batch's and >= vLLM's CPU
engine's; 1 client within 15% of HF's per-token latency; 64 clients: none refused, tokens/s >= 16
clients'; the mask <= +10% ITL; shared prefix >= 3x without caching; long prompt: streams' ITL p99 <= 2x
without it.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from shared.paths import DEFAULT_MODEL_DIR
from tools.bench import baselines, decode_step
from tools.bench.common import save, table


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def make_prompts(model_dir: Path, n: int, length: int = 32) -> list[list[int]]:
    from llm.tokenizers import Tokenizer
    from tools.assets import ensure_asset

    tok = Tokenizer.load(model_dir)
    blocks = [b["text"] for d in json.loads(ensure_asset("markov-corpus").read_text()) for b in d["blocks"]]
    out = []
    for text in blocks:
        ids = tok.encode(text)
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise RuntimeError("corpus too short")


def hf_model(model_dir: Path, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()


def hf_generate(model, prompts: list[list[int]], n: int) -> float:
    """Seconds for greedy ``generate()`` of exactly ``n`` new tokens for ``prompts`` as one batch."""
    import torch

    x = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
        )
    return time.perf_counter() - t0


def baseline_hf(model_dir: Path, prompts: list[list[int]], new_tokens: int, dtype: str) -> dict:
    model = hf_model(model_dir, dtype)

    def gen(ids: list[int], n: int) -> float:
        return hf_generate(model, [ids], n)

    gen(prompts[0], 4)  # warm-up
    one = statistics.median(gen(prompts[0], 1) for _ in range(3))
    full = statistics.median(gen(prompts[0], new_tokens) for _ in range(3))
    t0 = time.perf_counter()
    for ids in prompts:
        gen(ids, new_tokens)
    wall = time.perf_counter() - t0
    return {
        "tokens_per_s": len(prompts) * new_tokens / wall,
        "wall_s": wall,
        "decode_ms_per_token": (full - one) / (new_tokens - 1) * 1000,
        "first_token_s": one,
    }


def baseline_hf_static(model_dir: Path, prompts: list[list[int]], new_tokens: int, dtype: str) -> dict:
    """HF ``generate()`` over all prompts as one static batch (the prompts are of one length: no padding),
    the best a server that batches whole requests together can do: median of 3 after a warm-up."""
    model = hf_model(model_dir, dtype)
    hf_generate(model, prompts, 4)  # warm-up
    wall = statistics.median(hf_generate(model, prompts, new_tokens) for _ in range(3))
    return {"tokens_per_s": len(prompts) * new_tokens / wall, "wall_s": wall, "batch": len(prompts)}


def stream_one(url: str, ids: list[int], new_tokens: int, extra: dict | None = None) -> dict:
    body = (extra or {}) | {
        "prompt": [ids],
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    times, usage = [], None
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if doc.get("usage"):
                usage = doc["usage"]
            elif doc["choices"] and doc["choices"][0]["finish_reason"] is None:
                times.append(time.perf_counter() - t0)
    return {
        "ttft": times[0] if times else float("nan"),
        "itl": [b - a for a, b in zip(times, times[1:])],
        "tokens": usage["completion_tokens"] if usage else len(times),
        "e2e": time.perf_counter() - t0,
    }


GUIDE_ALL = "[^\\x00]*"  # a constraint nearly every token satisfies: the same text, every step masked


def long_ids(model_dir: Path, length: int, offset: int = 0) -> list[int]:
    """``length`` tokens of the shipped corpus, its blocks one after another, from token ``offset``."""
    from llm.tokenizers import Tokenizer
    from tools.assets import ensure_asset

    tok = Tokenizer.load(model_dir)
    ids: list[int] = []
    for d in json.loads(ensure_asset("markov-corpus").read_text()):
        for b in d["blocks"]:
            ids += tok.encode(b["text"])
            if len(ids) >= offset + length:
                return ids[offset : offset + length]
    raise RuntimeError("corpus too short")


def complete(url: str, ids: list[int], new_tokens: int) -> float:
    """Seconds for one non-streaming completion."""
    t0 = time.perf_counter()
    body = {"prompt": [ids], "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    r = requests.post(f"{url}/v1/completions", json=body, timeout=900)
    r.raise_for_status()
    return time.perf_counter() - t0


def shared_prefix(url: str, model_dir: Path) -> dict:
    """16 clients, each prompt a 1,000-token shared prefix + 16 tokens of its own, 16 new tokens."""
    prefix = long_ids(model_dir, 1000)
    tails = make_prompts(model_dir, 16, 16)
    complete(url, long_ids(model_dir, 40, 5000), 2)  # warm-up, nothing shared with the workload
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda t: complete(url, prefix + t, 16), tails))
    wall = time.perf_counter() - t0
    return {"requests": 16, "tokens_per_s": 16 * 16 / wall, "wall_s": wall}


def long_prompt_arrival(url: str, model_dir: Path, prompts: list[list[int]]) -> dict:
    """ITL p99 of 8 streams of 96 tokens alone, then with a 1,500-token prompt arriving 1 s in."""
    quiet = megastack_level(url, prompts[:8], 96, 8)
    long = long_ids(model_dir, 1500, 2000)
    with cf.ThreadPoolExecutor(1) as ex:
        t0 = time.perf_counter()
        streams = cf.ThreadPoolExecutor(8)
        futs = [streams.submit(stream_one, url, ids, 96) for ids in prompts[:8]]
        time.sleep(1.0)
        arrival = ex.submit(complete, url, long, 1)
        results = [f.result() for f in futs]
        long_s = arrival.result()
        streams.shutdown()
    itl = [x for r in results for x in r["itl"]]
    return {
        "itl_p99_alone_ms": quiet["itl_p99_ms"],
        "itl_p99_with_long_prompt_ms": pct(itl, 99) * 1000,
        "ratio": pct(itl, 99) * 1000 / quiet["itl_p99_ms"],
        "long_prompt_s": long_s,
        "wall_s": time.perf_counter() - t0,
    }


def start_stack(model_dir: Path, dtype: str, **env: str):
    from tools.stack import StackOptions, up

    return up(
        StackOptions(
            run_dir=Path(tempfile.mkdtemp(prefix="bench-textgen-")),
            model_dir=model_dir,
            services=("textgen", "gateway"),
            free_ports=True,
            textgen_env={"MEGASTACK_TEXTGEN_DTYPE": dtype, **env},
        ),
        log=lambda _: None,
    )


def megastack_level(
    url: str, prompts: list[list[int]], new_tokens: int, clients: int, extra: dict | None = None
) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(lambda ids: stream_one(url, ids, new_tokens, extra), prompts))
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50) * 1000,
        "itl_p99_ms": pct(itl, 99) * 1000,
    }


def median_run(runs: list[dict]) -> dict:
    """The run whose tokens/s is the median of ``runs`` (an odd number of them)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def level_row(engine: str, lv: dict) -> list[str]:
    """One row of the results table for a client level of ``engine``."""
    return [
        f"{engine}, {lv['clients']} clients",
        f"{lv['tokens_per_s']:.1f}",
        f"{lv['throughput_ratio']:.2f}",
        f"{lv['ttft_p50_s']:.3f}",
        f"{lv['ttft_p99_s']:.3f}",
        f"{lv['itl_p50_ms']:.1f}",
        f"{lv['itl_p99_ms']:.1f}",
    ]


def run_baselines(model: Path, dtype: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """Each other engine (tools/bench/baselines.py) at 1, 4 and 16 clients where installed: name -> its
    levels, or the reason it was not run."""
    out: dict = {}
    for name, found in (
        ("vLLM CPU engine", baselines.vllm(model, dtype, len(prompts))),
        ("llama.cpp llama-server", baselines.llama_server(model, dtype, len(prompts))),
    ):
        if isinstance(found, str):
            out[name] = found
            continue
        print(f"{found.name}: starting ...", flush=True)
        try:
            with baselines.serving(found) as url:
                stream_one(url, prompts[0], 8, found.extra)  # warm-up
                out[name] = []
                for clients in (1, 4, 16):
                    print(f"{found.name}: {clients} concurrent clients ...", flush=True)
                    out[name].append(megastack_level(url, prompts, new_tokens, clients, found.extra))
        except (RuntimeError, requests.RequestException) as e:
            out[name] = f"failed: {e}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    a = ap.parse_args()
    prompts = make_prompts(a.model, max(a.requests, 64))
    wide, prompts = prompts[:64], prompts[: a.requests]
    print(
        f"baseline: HF generate(), {a.requests} requests one at a time, {a.new_tokens} new tokens each ...",
        flush=True,
    )
    base = baseline_hf(a.model, prompts, a.new_tokens, a.dtype)
    print("decode step in process: composed vs one compiled call, float32 and bfloat16 ...", flush=True)
    step = decode_step.measure(a.model)
    print(f"baseline: HF generate(), all {a.requests} requests as one static batch ...", flush=True)
    static = baseline_hf_static(a.model, prompts, a.new_tokens, a.dtype)
    stack = start_stack(a.model, a.dtype)
    levels = []
    try:
        url = stack.endpoint("gateway", "http")
        stream_one(url, prompts[0], 8)  # warm-up
        for clients in (1, 4):
            print(f"megastack: {clients} concurrent clients ...", flush=True)
            levels.append(megastack_level(url, prompts, a.new_tokens, clients))
        # 16 vs 64 clients: 3 rounds of the two back to back, each level's median run (one pair alone is
        # within this host's run-to-run drift of 10-25%)
        rounds = []
        for r in range(3):
            print(f"megastack: 16 then 64 concurrent clients, round {r + 1}/3 ...", flush=True)
            rounds.append(
                (
                    megastack_level(url, prompts, a.new_tokens, 16),
                    megastack_level(url, wide, a.new_tokens, 64),
                )
            )
        levels += [median_run([r[i] for r in rounds]) for i in (0, 1)]
        # the mask's cost: 3 pairs of runs, masked and not, back to back (the host drifts 10-25% over minutes)
        pairs = []
        for r in range(3):
            print(
                f"megastack: 16 clients, with and without a structured-output mask, pair {r + 1}/3 ...",
                flush=True,
            )
            pairs.append(
                (
                    megastack_level(url, prompts, a.new_tokens, 16, {"guided_regex": GUIDE_ALL}),
                    megastack_level(url, prompts, a.new_tokens, 16),
                )
            )
        # the pair whose cost is the median of the three
        masked, unmasked = sorted(pairs, key=lambda p: p[0]["itl_p50_ms"] / p[1]["itl_p50_ms"])[1]
        print("megastack: shared 1,000-token prefix, prefix caching on ...", flush=True)
        cached = shared_prefix(url, a.model)
        print("megastack: 8 streams while a 1,500-token prompt arrives, chunked prefill on ...", flush=True)
        chunked = long_prompt_arrival(url, a.model, prompts)
    finally:
        stack.down()
    stack = start_stack(a.model, a.dtype, MEGASTACK_TEXTGEN_PREFIX_CACHING="false")
    try:
        print("megastack: shared 1,000-token prefix, prefix caching off ...", flush=True)
        uncached = shared_prefix(stack.endpoint("gateway", "http"), a.model)
    finally:
        stack.down()
    stack = start_stack(a.model, a.dtype, MEGASTACK_TEXTGEN_PREFILL_CHUNK_TOKENS="100000")
    try:
        print("megastack: 8 streams while a 1,500-token prompt arrives, chunked prefill off ...", flush=True)
        unchunked = long_prompt_arrival(stack.endpoint("gateway", "http"), a.model, prompts)
    finally:
        stack.down()
    others = run_baselines(a.model, a.dtype, prompts, a.new_tokens)
    for lv in levels + [lv for o in others.values() if isinstance(o, list) for lv in o]:
        lv["throughput_ratio"] = lv["tokens_per_s"] / base["tokens_per_s"]
        lv["latency_ratio"] = lv["itl_p50_ms"] / base["decode_ms_per_token"]
    rows = [
        [
            "HF generate, sequential",
            f"{base['tokens_per_s']:.1f}",
            "1.00",
            f"{base['first_token_s']:.3f}",
            "-",
            f"{base['decode_ms_per_token']:.1f}",
            "-",
        ],
        [
            f"HF generate, static batch of {static['batch']}",
            f"{static['tokens_per_s']:.1f}",
            f"{static['tokens_per_s'] / base['tokens_per_s']:.2f}",
            "-",
            "-",
            "-",
            "-",
        ],
    ]
    rows += [level_row("megastack", lv) for lv in levels]
    rows += [level_row(name, lv) for name, runs in others.items() if isinstance(runs, list) for lv in runs]
    print(
        f"\nmodel {a.model.name} ({a.dtype}), {a.requests} requests x {a.new_tokens} tokens, prompts of 32 "
        "tokens"
    )
    print(
        table(["run", "tokens/s", "x baseline", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms"], rows)
    )
    l1, l16, l64 = levels[0], levels[2], levels[3]
    ok16 = l16["throughput_ratio"] >= 4.0
    ok1 = l1["latency_ratio"] <= 1.15
    vs_static = l16["tokens_per_s"] / static["tokens_per_s"]
    ok_static = vs_static >= 1.5
    print(
        f"\n16 clients: {l16['throughput_ratio']:.2f}x baseline tokens/s (target >= 4x): "
        f"{'met' if ok16 else 'NOT met'}"
    )
    print(
        f"16 clients: {vs_static:.2f}x HF's static batch of {static['batch']} "
        f"({static['tokens_per_s']:.1f} tokens/s; target >= 1.5x): {'met' if ok_static else 'NOT met'}"
    )
    all_served = all(r[1]["tokens"] == 64 * a.new_tokens for r in rounds)
    ok64 = all_served and l64["tokens_per_s"] >= l16["tokens_per_s"]
    print(
        f"64 clients: {'all' if all_served else 'NOT all'} {64 * a.new_tokens} tokens served in each of 3 "
        f"rounds{' (none refused)' if all_served else ''}, median {l64['tokens_per_s']:.1f} tokens/s vs "
        f"{l16['tokens_per_s']:.1f} at 16 (target: all served, >= 16 clients'): "
        f"{'met' if ok64 else 'NOT met'}; per round (16 / 64): "
        + ", ".join(f"{x['tokens_per_s']:.1f} / {y['tokens_per_s']:.1f}" for x, y in rounds)
    )
    mask_cost = masked["itl_p50_ms"] / unmasked["itl_p50_ms"] - 1
    ok_mask = mask_cost <= 0.10
    print(
        f"structured output at 16 clients: ITL p50 {masked['itl_p50_ms']:.1f} ms with a mask on every "
        f"token vs {unmasked['itl_p50_ms']:.1f} ms without, the median of 3 back-to-back pairs = "
        f"{mask_cost:+.1%} "
        f"(target <= +10%): {'met' if ok_mask else 'NOT met'}; per pair: "
        + ", ".join(f"{m['itl_p50_ms'] / u['itl_p50_ms'] - 1:+.1%}" for m, u in pairs)
    )
    prefix_x = cached["tokens_per_s"] / uncached["tokens_per_s"]
    ok_prefix = prefix_x >= 3.0
    print(
        f"shared 1,000-token prefix, 16 clients: {cached['tokens_per_s']:.1f} tokens/s with prefix caching, "
        f"{uncached['tokens_per_s']:.1f} without = {prefix_x:.2f}x (target >= 3x): "
        f"{'met' if ok_prefix else 'NOT met'}"
    )
    for name, r in (("on", chunked), ("off", unchunked)):
        print(
            f"8 streams, a 1,500-token prompt arrives, chunked prefill {name}: ITL p99 "
            f"{r['itl_p99_with_long_prompt_ms']:.0f} ms vs {r['itl_p99_alone_ms']:.0f} ms alone = "
            f"{r['ratio']:.2f}x (target <= 2x: {'met' if r['ratio'] <= 2 else 'NOT met'}); the long prompt "
            f"took {r['long_prompt_s']:.1f} s"
        )
    ok_vllm = None
    for name, runs in others.items():
        if not isinstance(runs, list):
            print(f"{name}: {runs}")
            continue
        theirs = next(lv for lv in runs if lv["clients"] == 16)["tokens_per_s"]
        vs = l16["tokens_per_s"] / theirs
        line = f"16 clients: {vs:.2f}x {name}'s {theirs:.1f} tokens/s"
        if name.startswith("vLLM"):
            ok_vllm = vs >= 1.0
            line += f" (target >= 1x): {'met' if ok_vllm else 'NOT met'}"
        print(line)
    print(
        f"1 client: per-token latency {l1['itl_p50_ms']:.1f} ms vs HF decode "
        f"{base['decode_ms_per_token']:.1f} ms "
        f"= {l1['latency_ratio']:.2f}x (target <= 1.15x): {'met' if ok1 else 'NOT met'}"
    )
    print("\n".join(decode_step.report(step)))
    save(
        "textgen",
        {
            "config": vars(a) | {"model": str(a.model)},
            "baseline_hf_generate": base,
            "baseline_hf_static_batch": static,
            "baselines": others,
            "megastack": levels,
            "megastack_16_and_64_clients_rounds": rounds,
            "decode_step": step,
            "structured_output_16_clients": {"pairs": pairs, "itl_cost": mask_cost},
            "shared_prefix": {"prefix_caching_on": cached, "prefix_caching_off": uncached, "ratio": prefix_x},
            "long_prompt_arrival": {"chunked_prefill_on": chunked, "chunked_prefill_off": unchunked},
            "targets": {
                "throughput_16_clients_ge_4x": ok16,
                "latency_1_client_le_1_15x": ok1,
                "throughput_16_clients_ge_1_5x_hf_static_batch": ok_static,
                "clients_64_all_served_and_ge_16_clients": ok64,
                "shared_prefix_ge_3x": ok_prefix,
                "structured_output_mask_le_10pct": ok_mask,
                "long_prompt_itl_p99_le_2x": chunked["ratio"] <= 2,
                "throughput_16_clients_ge_vllm": ok_vllm,  # None: vLLM not installed
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
