"""Serving benchmark: HF generate() (one at a time; one static batch) vs. megastack through the gateway.

    python tools/bench/textgen.py [--requests 16] [--new-tokens 64] [--dtype float32]

Same prompts (32 tokens each, cut from the shipped prose corpus), same model (the default
SmolLM2-135M), same machine, one script:
(a) baselines: HF ``model.generate()`` serving the requests one at a time (what Megatron's global lock
    gives), greedy, exactly ``--new-tokens`` tokens each; and HF ``generate()`` over all of them as one
    static batch (no padding: the prompts are of one length);
(b) megastack: the real stack (textgen + gateway processes), ``--requests`` streaming
    ``/v1/completions`` calls from 1, 4 and 16 concurrent clients.
Reported: generated tokens/s, p50/p99 time to first token and inter-token latency, ratios to (a).
Targets: 16 clients >= 4x the sequential baseline's tokens/s and >= 1.5x the static batch's; 1 client within
15% of HF's per-token latency. vLLM's CPU engine and llama.cpp's server are not driven by this bench yet.
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


def stream_one(url: str, ids: list[int], new_tokens: int) -> dict:
    body = {
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


def megastack_level(url: str, prompts: list[list[int]], new_tokens: int, clients: int) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(lambda ids: stream_one(url, ids, new_tokens), prompts))
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    a = ap.parse_args()
    prompts = make_prompts(a.model, a.requests)
    print(
        f"baseline: HF generate(), {a.requests} requests one at a time, {a.new_tokens} new tokens each ...",
        flush=True,
    )
    base = baseline_hf(a.model, prompts, a.new_tokens, a.dtype)
    print(f"baseline: HF generate(), all {a.requests} requests as one static batch ...", flush=True)
    static = baseline_hf_static(a.model, prompts, a.new_tokens, a.dtype)
    from tools.stack import StackOptions, up

    run_dir = Path(tempfile.mkdtemp(prefix="bench-textgen-"))
    stack = up(
        StackOptions(
            run_dir=run_dir,
            model_dir=a.model,
            services=("textgen", "gateway"),
            free_ports=True,
            textgen_env={"MEGASTACK_TEXTGEN_DTYPE": a.dtype, "MEGASTACK_TEXTGEN_MAX_BATCH_SIZE": "16"},
        ),
        log=lambda _: None,
    )
    levels = []
    try:
        url = stack.endpoint("gateway", "http")
        stream_one(url, prompts[0], 8)  # warm-up
        for clients in (1, 4, 16):
            print(f"megastack: {clients} concurrent clients ...", flush=True)
            levels.append(megastack_level(url, prompts, a.new_tokens, clients))
    finally:
        stack.down()
    for lv in levels:
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
    for lv in levels:
        rows.append(
            [
                f"megastack, {lv['clients']} clients",
                f"{lv['tokens_per_s']:.1f}",
                f"{lv['throughput_ratio']:.2f}",
                f"{lv['ttft_p50_s']:.3f}",
                f"{lv['ttft_p99_s']:.3f}",
                f"{lv['itl_p50_ms']:.1f}",
                f"{lv['itl_p99_ms']:.1f}",
            ]
        )
    print(
        f"\nmodel {a.model.name} ({a.dtype}), {a.requests} requests x {a.new_tokens} tokens, prompts of 32 "
        "tokens"
    )
    print(
        table(["run", "tokens/s", "x baseline", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "ITL p99 ms"], rows)
    )
    l1, l16 = levels[0], levels[-1]
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
    print("vLLM's CPU engine, llama.cpp's llama-server: not run (this bench does not drive them yet)")
    print(
        f"1 client: per-token latency {l1['itl_p50_ms']:.1f} ms vs HF decode "
        f"{base['decode_ms_per_token']:.1f} ms "
        f"= {l1['latency_ratio']:.2f}x (target <= 1.15x): {'met' if ok1 else 'NOT met'}"
    )
    save(
        "textgen",
        {
            "config": vars(a) | {"model": str(a.model)},
            "baseline_hf_generate": base,
            "baseline_hf_static_batch": static,
            "vllm_cpu": "not run",
            "llama_cpp_server": "not run",
            "megastack": levels,
            "targets": {
                "throughput_16_clients_ge_4x": ok16,
                "latency_1_client_le_1_15x": ok1,
                "throughput_16_clients_ge_1_5x_hf_static_batch": ok_static,
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
