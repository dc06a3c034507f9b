"""tools/gpu_check.py runs on the CPU in make test, so the script that proves the GPU paths never rots;
and a failing check makes it fail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shared.paths import REPO_ROOT
from tools import gpu_check


def test_every_check_passes_on_the_cpu(tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--device", "cpu", "--steps", "6", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert r.returncode == 0 and report["passed"], (r.stdout[-3000:], r.stderr[-3000:])
    assert set(checks) == {
        "textgen[float32]",
        "textgen[bfloat16]",
        "textgen_smollm2",
        "converter_verify",
        "moe",
        "training",
        "evaluator_scores",
    }
    assert report["environment"]["device"] == "cpu" and report["environment"]["megatron_core"] == "0.16.1"
    assert all(c["passed"] is True for n, c in checks.items() if n != "textgen_smollm2")
    assert checks["textgen_smollm2"]["passed"] in (True, None)  # None: the default model is not prepared here
    f32 = checks["textgen[float32]"]["figures"]
    assert f32["greedy_vs_hf"] == {"compared_tokens": 64, "agreeing_tokens": 64, "cut_at_near_tie": 0}
    assert f32["seeded_sample_reproducible"] and f32["concurrent_16_equal_to_solo"] == 16
    assert f32["cancel_frees_slot"] and f32["fault_fails_alone"]
    t = checks["training"]["figures"]
    assert (
        t["precision"] == "bf16"
        and t["steps"] == 6
        and t["resumed_steps"] == 3
        and t["resume_max_rel_diff"] == 0.0
    )
    assert t["loss_last"] < t["loss_first"] and t["transformer_engine"] == "no CUDA device"
    assert checks["converter_verify"]["figures"]["max_abs_logit_diff"] < 1e-4
    moe = checks["moe"]["figures"]
    greedy = moe["greedy_vs_hf"]
    assert (
        moe["converter"]["max_abs_logit_diff"] < 1e-4
        and greedy["agreeing_tokens"] == greedy["compared_tokens"]
    )
    assert checks["evaluator_scores"]["figures"]["max_abs_logprob_diff"] <= 1e-3


def test_a_failing_or_crashing_check_fails_the_run(tmp_path, monkeypatch):
    def crash(c, assets, device):
        raise RuntimeError("scores went missing")

    monkeypatch.setattr(gpu_check, "check_scores", crash)
    out = tmp_path / "r.json"
    assert gpu_check.main(["--device", "cpu", "--only", "evaluator_scores", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["passed"] is False and report["failed"] == ["evaluator_scores"]
    assert "scores went missing" in report["checks"][0]["error"]

    monkeypatch.setattr(
        gpu_check, "check_scores", lambda c, assets, device: c.expect(False, "a figure out of range")
    )
    assert gpu_check.main(["--device", "cpu", "--only", "evaluator_scores", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["checks"][0]["failures"] == ["a figure out of range"]


def test_greedy_comparison_stops_at_a_near_tie_and_counts_disagreement():
    ours = [[1, 2, 3, 4], [5, 6, 7, 8]]
    theirs = [([1, 2, 9, 4], [1.0, 1.0, 0.01, 1.0]), ([5, 0, 7, 8], [1.0, 1.0, 1.0, 1.0])]
    assert gpu_check.compare_greedy(ours, theirs, tie=0.05) == {
        "compared_tokens": 4,
        "agreeing_tokens": 3,
        "cut_at_near_tie": 1,
    }
    assert gpu_check.compare_greedy(ours, theirs, tie=0.0)["agreeing_tokens"] == 3


@pytest.mark.parametrize("args", [["--steps", "5"], ["--only", "nonsense"], ["--device", "cuda"]])
def test_bad_arguments_are_refused(args):
    if args == ["--device", "cuda"] and gpu_check.torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        gpu_check.main(args)
    assert e.value.code == 2
