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
import json
import os
import platform
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

from tools.gpu_checks import Check  # noqa: E402
from tools.gpu_checks.serving import (  # noqa: E402
    check_moe,
    check_scores,
    check_smollm2,
    check_textgen,
    compare_greedy,  # noqa: F401 - tests reach it here
)
from tools.gpu_checks.training import check_converter, check_training  # noqa: E402


# -- assets (tiny, offline) ------------------------------------------------------------------------
def make_assets(root: Path) -> dict[str, Path]:
    from tools.tiny import make_tiny_hf, synthetic_lines, train_tokenizer

    tok = train_tokenizer(root / "tok", lines=synthetic_lines(2000))
    llama = make_tiny_hf("llama", root / "llama", tok, num_hidden_layers=4)
    return {"tok": tok, "llama": llama, "mixtral": make_tiny_hf("mixtral", root / "mixtral", tok)}


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
