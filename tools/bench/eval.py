"""Evaluation benchmark: megastack's gRPC-backed lm-eval model vs. lm-eval's own `hf` model.

    python tools/bench/eval.py [--repeats 3] [--batch-size 16] [--dtype float32]

Two offline multiple-choice workloads from the shipped suite: megastack_capitals (0-shot, 30 questions x 4
choices = 120 loglikelihood requests; target: as fast as `hf`) and megastack_sums (5-shot, 150 questions x 4
= 600 requests, every prompt behind the same 5 worked examples as in MMLU; target: 1.5x `hf`), on the
default SmolLM2-135M, same checkpoint, same dtype, same batch size, one script:
(a) baseline: lm-eval's `hf` model (HFLM, transformers in this process);
(b) megastack: `megastack-textgen` (TextgenLM) against real textgen server processes started by the stack,
    one with the default batch invariance (``scoring``: prompts to score go through packed passes whose
    every row is the same whatever it is computed with, prefix-cache hits included, so scores cannot move
    with the load) and one with ``MEGASTACK_TEXTGEN_BATCH_INVARIANT=off``, the cost of that guarantee
    measured in the same run.
Both models are built before the clock starts (the servers are already serving, HFLM already loaded);
what is timed is `lm_eval.simple_evaluate` over the task, the three alternating, best of --repeats each. Each
megastack run gets a fresh server: its prefix cache starts empty, so no run reuses what an earlier one
computed (a shared few-shot prefix is computed once within the run, as it would be the first time).
Reported: requests/s, accuracy (must agree), and the ratios. Then the evaluator's request cache: the task
once more with an empty cache, and again from it (nothing sent to textgen); its time against the uncached
run's (target: at most 5%).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from shared.paths import DEFAULT_MODEL_DIR
from tools.bench.common import save, table

# (task, what it stands for, the requests/s target against lm-eval hf with the default batch invariance)
WORKLOADS = (
    ("megastack_capitals", "0-shot multiple choice, 120 requests", 1.0),
    (
        "megastack_sums",
        "5-shot multiple choice sharing one few-shot prefix (MMLU's shape), 600 requests",
        1.5,
    ),
)
MODES = ("scoring", "off")  # textgen batch invariance: the default, and none


def timed_eval(lm, tm, task: str) -> dict:
    import lm_eval

    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=tm,
        bootstrap_iters=0,
        log_samples=False,
        random_seed=1234,
        numpy_random_seed=1234,
        torch_random_seed=1234,
    )
    took = time.perf_counter() - t0
    n = sum(v["effective"] for v in res["n-samples"].values()) * 4
    return {
        "seconds": took,
        "requests": n,
        "acc": res["results"][task]["acc,none"],
        "acc_norm": res["results"][task]["acc_norm,none"],
    }


def best_of(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["seconds"])
    return {
        **best,
        "seconds_runs": [round(r["seconds"], 3) for r in runs],
        "requests_per_s": best["requests"] / best["seconds"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--task", action="append", default=[], help="only these workloads (default: all)")
    a = ap.parse_args()
    from services.evaluator.api import offline_env, task_manager

    offline_env()
    import lm_eval.models  # noqa: F401
    from lm_eval.models.huggingface import HFLM

    tm = task_manager()
    print(
        f"baseline: lm-eval `hf` on {a.model.name} ({a.dtype}), batch {a.batch_size}; megastack: a textgen "
        "server ...",
        flush=True,
    )
    hf = HFLM(
        pretrained=str(a.model),
        dtype=a.dtype,
        batch_size=a.batch_size,
        device="cpu" if not _cuda() else "cuda",
    )
    results = {}
    for task, what, target in WORKLOADS:
        if a.task and task not in a.task:
            continue
        results[task] = run_workload(a, task, what, target, hf, tm)
    save(
        "eval",
        {
            "config": vars(a) | {"model": str(a.model)},
            "workloads": results,
            "targets": {task: r["target_met"] for task, r in results.items()},
        },
    )
    return 0


@contextmanager
def textgen_server(a, mode: str):
    """A fresh textgen server (its prefix cache empty) in batch-invariance ``mode``: its gRPC address."""
    from tools.stack import StackOptions, up

    st = up(
        StackOptions(
            run_dir=Path(tempfile.mkdtemp(prefix=f"bench-eval-{mode}-")),
            model_dir=a.model,
            services=("textgen",),
            free_ports=True,
            textgen_env={
                "MEGASTACK_TEXTGEN_DTYPE": a.dtype,
                "MEGASTACK_TEXTGEN_MAX_BATCH_SIZE": str(a.batch_size),
                "MEGASTACK_TEXTGEN_BATCH_INVARIANT": mode,
            },
        ),
        log=lambda _: None,
    )
    try:
        yield st.endpoint("textgen", "grpc")
    finally:
        st.down()


def run_workload(a, task: str, what: str, target: float, hf, tm) -> dict:
    """One task: lm-eval hf and megastack alternating, best of --repeats, megastack on a fresh server each
    time (its prefix cache empty: every run is a first run); then the request cache, on a fresh server too."""
    from services.evaluator.api import RequestCache, TextgenLM

    print(f"\n== {task}: {what}", flush=True)
    base_runs: list[dict] = []
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for i in range(a.repeats):  # alternating: the host's speed drifts by +-10-20% over minutes
        print(f"round {i + 1}/{a.repeats}: lm-eval hf, then megastack-textgen ({', '.join(MODES)}) ...")
        base_runs.append(timed_eval(hf, tm, task))
        for m in MODES:
            with textgen_server(a, m) as address:  # started before the clock starts
                runs[m].append(timed_eval(TextgenLM(address, batch_size=a.batch_size), tm, task))
    print("request cache: the task with an empty cache, then again from it ...", flush=True)
    cache_path = Path(tempfile.mkdtemp(prefix="bench-eval-cache-")) / "cache.sqlite"
    with textgen_server(a, "scoring") as address:
        cold = timed_eval(
            TextgenLM(address, batch_size=a.batch_size, cache=RequestCache(cache_path)), tm, task
        )
        warm_lm = TextgenLM(address, batch_size=a.batch_size, cache=RequestCache(cache_path))
        warm = timed_eval(warm_lm, tm, task) | {"sent": warm_lm.sent, "hits": warm_lm.cache.hits}
    base = best_of(base_runs)
    ours = {m: best_of(r) for m, r in runs.items()}
    for o in ours.values():
        o["ratio"] = o["requests_per_s"] / base["requests_per_s"]
    ratio = ours["scoring"]["ratio"]
    rows = [
        [
            "lm-eval hf (baseline)",
            base["requests"],
            f"{base['seconds']:.2f}",
            f"{base['requests_per_s']:.1f}",
            "1.00",
            f"{base['acc']:.3f}",
            f"{base['acc_norm']:.3f}",
        ]
    ]
    for m, o in ours.items():
        rows.append(
            [
                f"megastack-textgen (gRPC), batch invariance {m}",
                o["requests"],
                f"{o['seconds']:.2f}",
                f"{o['requests_per_s']:.1f}",
                f"{o['ratio']:.2f}",
                f"{o['acc']:.3f}",
                f"{o['acc_norm']:.3f}",
            ]
        )
    print(f"\n{task} on {a.model.name} ({a.dtype}), batch size {a.batch_size}, best of {a.repeats}")
    print(table(["model", "requests", "seconds", "requests/s", "x baseline", "acc", "acc_norm"], rows))
    ok = ratio >= target
    agree = all(
        abs(o["acc"] - base["acc"]) < 1e-9 and abs(o["acc_norm"] - base["acc_norm"]) < 1e-9
        for o in ours.values()
    )
    cost = ours["off"]["requests_per_s"] / ours["scoring"]["requests_per_s"]
    print(
        f"\nrequests/s {ratio:.2f}x lm-eval hf with the default batch invariance (target >= {target:g}x): "
        f"{'met' if ok else 'NOT met'}; without it {ours['off']['ratio']:.2f}x (the guarantee costs "
        f"{cost:.2f}x here); scores {'agree' if agree else 'DIFFER'}"
    )
    share = warm["seconds"] / cold["seconds"]
    print(
        f"request cache: re-run {warm['seconds']:.2f} s vs {cold['seconds']:.2f} s uncached = {share:.1%} "
        f"(target <= 5%: {'met' if share <= 0.05 else 'NOT met'}); {warm['sent']} requests sent, "
        f"{warm['hits']} answered from the cache; scores "
        f"{'agree' if warm['acc'] == cold['acc'] else 'DIFFER'}"
    )
    return {
        "what": what,
        "baseline_lm_eval_hf": base,
        "megastack": ours["scoring"],
        "megastack_batch_invariance_off": ours["off"],
        "ratio_requests_per_s": ratio,
        "target_ratio": target,
        "target_met": ok,
        "batch_invariance_cost": cost,
        "scores_agree": agree,
        "request_cache": {"cold": cold, "rerun": warm, "rerun_share": share},
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
