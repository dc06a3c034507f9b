"""Evaluation benchmark: megastack's gRPC-backed lm-eval model vs. lm-eval's own `hf` model.

    python tools/bench/eval.py [--repeats 3] [--batch-size 16] [--dtype float32]

The offline multiple-choice task (megastack_capitals: 30 questions x 4 choices = 120 loglikelihood
requests) on the default SmolLM2-135M, same checkpoint, same dtype, same batch size, one script:
(a) baseline: lm-eval's `hf` model (HFLM, transformers in this process);
(b) megastack: `megastack-textgen` (TextgenLM) against real textgen server processes started by the stack,
    one with the default batch invariance (``scoring``: each scoring request in forward passes of its own,
    so scores cannot move with the load) and one with ``MEGASTACK_TEXTGEN_BATCH_INVARIANT=off``, the cost of
    that guarantee measured in the same run.
Both models are built before the clock starts (the servers are already serving, HFLM already loaded);
what is timed is `lm_eval.simple_evaluate` over the task, the three alternating, best of --repeats each.
Reported: requests/s, accuracy (must agree), and the ratios. Target: megastack at least as fast as `hf`.
Then the evaluator's request cache: the task once more with an empty cache, and again from it (nothing sent
to textgen); its time against the uncached run's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from shared.paths import DEFAULT_MODEL_DIR
from tools.bench.common import save, table

TASK = "megastack_capitals"
MODES = ("scoring", "off")  # textgen batch invariance: the default, and none


def timed_eval(lm, tm) -> dict:
    import lm_eval

    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=[TASK],
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
        "acc": res["results"][TASK]["acc,none"],
        "acc_norm": res["results"][TASK]["acc_norm,none"],
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
    a = ap.parse_args()
    from services.evaluator.api import offline_env, task_manager

    offline_env()
    import lm_eval.models  # noqa: F401
    from lm_eval.models.huggingface import HFLM

    from services.evaluator.api import TextgenLM
    from tools.stack import StackOptions, up

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
    stacks = {}
    for mode in MODES:
        stacks[mode] = up(
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
        lms = {
            m: TextgenLM(st.endpoint("textgen", "grpc"), batch_size=a.batch_size) for m, st in stacks.items()
        }
        base_runs: list[dict] = []
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for i in range(a.repeats):  # alternating: the host's speed drifts by +-10-20% over minutes
            print(f"round {i + 1}/{a.repeats}: lm-eval hf, then megastack-textgen ({', '.join(MODES)}) ...")
            base_runs.append(timed_eval(hf, tm))
            for m in MODES:
                runs[m].append(timed_eval(lms[m], tm))
        from services.evaluator.api import RequestCache

        print("request cache: the task with an empty cache, then again from it ...", flush=True)
        cache_path = Path(tempfile.mkdtemp(prefix="bench-eval-cache-")) / "cache.sqlite"
        address = stacks["scoring"].endpoint("textgen", "grpc")
        cold = timed_eval(TextgenLM(address, batch_size=a.batch_size, cache=RequestCache(cache_path)), tm)
        warm_lm = TextgenLM(address, batch_size=a.batch_size, cache=RequestCache(cache_path))
        warm = timed_eval(warm_lm, tm) | {"sent": warm_lm.sent, "hits": warm_lm.cache.hits}
    finally:
        for st in stacks.values():
            st.down()
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
    print(f"\n{TASK} on {a.model.name} ({a.dtype}), batch size {a.batch_size}, best of {a.repeats}")
    print(table(["model", "requests", "seconds", "requests/s", "x baseline", "acc", "acc_norm"], rows))
    ok = ratio >= 1.0
    agree = all(
        abs(o["acc"] - base["acc"]) < 1e-9 and abs(o["acc_norm"] - base["acc_norm"]) < 1e-9
        for o in ours.values()
    )
    cost = ours["off"]["requests_per_s"] / ours["scoring"]["requests_per_s"]
    print(
        f"\nrequests/s {ratio:.2f}x lm-eval hf with the default batch invariance (target >= 1x): "
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
    save(
        "eval",
        {
            "config": vars(a) | {"model": str(a.model), "task": TASK},
            "baseline_lm_eval_hf": base,
            "megastack": ours["scoring"],
            "megastack_batch_invariance_off": ours["off"],
            "ratio_requests_per_s": ratio,
            "batch_invariance_cost": cost,
            "scores_agree": agree,
            "request_cache": {"cold": cold, "rerun": warm, "rerun_share": share},
            "targets": {"at_least_as_fast_as_hf": ok},
        },
    )
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
