"""Evaluation benchmark: megastack's gRPC-backed lm-eval model vs. lm-eval's own `hf` model.

    python tools/bench/eval.py [--repeats 3] [--batch-size 16] [--dtype float32]

The offline multiple-choice task (megastack_capitals: 30 questions x 4 choices = 120 loglikelihood
requests) on the default SmolLM2-135M, same checkpoint, same dtype, same batch size, one script:
(a) baseline: lm-eval's `hf` model (HFLM, transformers in this process);
(b) megastack: `megastack-textgen` (TextgenLM) against a real textgen server process started by the stack.
Both models are built before the clock starts (the server is already serving, HFLM already loaded);
what is timed is `lm_eval.simple_evaluate` over the task, the two alternating, best of --repeats each.
Reported: requests/s, accuracy (must agree), and the ratio. Target: megastack at least as fast as `hf`.
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
    run_dir = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    stack = up(
        StackOptions(
            run_dir=run_dir,
            model_dir=a.model,
            services=("textgen",),
            free_ports=True,
            textgen_env={
                "MEGASTACK_TEXTGEN_DTYPE": a.dtype,
                "MEGASTACK_TEXTGEN_MAX_BATCH_SIZE": str(a.batch_size),
            },
        ),
        log=lambda _: None,
    )
    try:
        ours_lm = TextgenLM(stack.endpoint("textgen", "grpc"), batch_size=a.batch_size)
        base_runs, our_runs = [], []
        for i in range(a.repeats):  # alternating: the host's speed drifts by +-10-20% over minutes
            print(
                f"round {i + 1}/{a.repeats}: lm-eval hf, then megastack-textgen at "
                f"{stack.endpoint('textgen', 'grpc')} ...",
                flush=True,
            )
            base_runs.append(timed_eval(hf, tm))
            our_runs.append(timed_eval(ours_lm, tm))
    finally:
        stack.down()
    base, ours = best_of(base_runs), best_of(our_runs)
    ratio = ours["requests_per_s"] / base["requests_per_s"]
    rows = [
        [
            "lm-eval hf (baseline)",
            base["requests"],
            f"{base['seconds']:.2f}",
            f"{base['requests_per_s']:.1f}",
            "1.00",
            f"{base['acc']:.3f}",
            f"{base['acc_norm']:.3f}",
        ],
        [
            "megastack-textgen (gRPC)",
            ours["requests"],
            f"{ours['seconds']:.2f}",
            f"{ours['requests_per_s']:.1f}",
            f"{ratio:.2f}",
            f"{ours['acc']:.3f}",
            f"{ours['acc_norm']:.3f}",
        ],
    ]
    print(f"\n{TASK} on {a.model.name} ({a.dtype}), batch size {a.batch_size}, best of {a.repeats}")
    print(table(["model", "requests", "seconds", "requests/s", "x baseline", "acc", "acc_norm"], rows))
    ok = ratio >= 1.0
    agree = abs(ours["acc"] - base["acc"]) < 1e-9 and abs(ours["acc_norm"] - base["acc_norm"]) < 1e-9
    print(
        f"\nrequests/s {ratio:.2f}x lm-eval hf (target >= 1x): {'met' if ok else 'NOT met'}; "
        f"scores {'agree' if agree else 'DIFFER'}"
    )
    save(
        "eval",
        {
            "config": vars(a) | {"model": str(a.model), "task": TASK},
            "baseline_lm_eval_hf": base,
            "megastack": ours,
            "ratio_requests_per_s": ratio,
            "scores_agree": agree,
            "targets": {"at_least_as_fast_as_hf": ok},
        },
    )
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
