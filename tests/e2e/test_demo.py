"""`make demo`'s main job, end to end through real services, in temporary folders; re-runnable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.paths import REPO_ROOT
from tools.stack import free_port

MARKERS = ("services.", "megastack-ray", "raylet", "gcs_server", "tools.cli.main", "default_worker.py")


def _service_processes() -> dict[str, str]:
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(m in cmd for m in MARKERS):
                out[pid] = cmd
    return out


def test_demo_runs_the_whole_lifecycle_and_cleans_up(tmp_path):
    work, run = tmp_path / "work", tmp_path / "state"
    work.mkdir()
    (work / ".megastack-output").write_text("{}")  # an earlier demo's folder: the demo may empty it
    (work / "stale-file").write_text("from an earlier run")
    cmd = [
        str(REPO_ROOT / ".venv" / "bin" / "megastack")
        if (REPO_ROOT / ".venv" / "bin" / "megastack").exists()
        else sys.executable,
        "demo",
        "--work-dir",
        str(work),
        "--run-dir",
        str(run),
        "--train-iters",
        "2",
        "--port",
        str(free_port()),
    ]
    if cmd[0] == sys.executable:
        cmd[1:1] = ["-m", "tools.cli.main"]
    before = _service_processes()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "Traceback" not in out.stderr
    summary = text.split("== summary", 1)[1]
    for stage in (
        "preprocess",
        "convert HF->mcore",
        "train (Ray, PP=2)",
        "convert mcore->HF",
        "serve",
        "evaluate",
    ):
        assert stage in summary, stage
    assert summary.count("top-1 agreement 100.0%") == 2 and summary.count("weights exact: yes") == 2
    assert "PUT /api (24 tokens)" in summary
    # the artifacts: dataset, converted, trained (2 steps), served checkpoint, and lm-eval's results
    assert not (work / "stale-file").exists()
    assert (work / "data" / "prose_text_document.bin").is_file() and (
        work / "mcore" / "megastack.json"
    ).is_file()
    assert (work / "cpt" / "iter_0000002").is_dir() and (work / "hf" / "config.json").is_file()
    steps = [json.loads(line) for line in (work / "cpt" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if not s.get("done")] == [1, 2]
    results = next(run.glob("jobs/evaluator/eval-*/results.json"))
    assert "megastack_capitals" in json.loads(results.read_text())["results"]
    # every process it started is gone
    left = {p: c for p, c in _service_processes().items() if p not in before}
    assert not left, left


@pytest.mark.parametrize("which", ["--work-dir", "--run-dir"])
def test_demo_never_empties_a_folder_that_is_not_its_own(tmp_path, which):
    """The demo empties its folders first: a folder holding a user's files is refused (exit 2), byte for byte
    intact."""
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    other = tmp_path / "fresh"
    args = {"--work-dir": str(other), "--run-dir": str(other.with_name("fresh-run")), which: str(mine)}
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "demo", *[x for kv in args.items() for x in kv]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 2 and f"{which} {mine}" in out.stderr and "did not write" in out.stderr, (
        out.stderr[-2000:]
    )
    assert (mine / "chapter1.tex").read_text() == "years of work" and sorted(
        p.name for p in mine.iterdir()
    ) == ["chapter1.tex"]
    # nor one that holds the model it would read
    out = subprocess.run(
        [sys.executable, "-m", "tools.cli.main", "demo", "--work-dir", str(REPO_ROOT / "models")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 2 and "a folder that contains the input" in out.stderr, out.stderr[-2000:]
