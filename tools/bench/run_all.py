"""`make bench`: run every tools/bench/<name>.py, then write docs/benchmarks.md from what they printed.

    python tools/bench/run_all.py [NAME ...]      (make bench [BENCH="textgen preprocess"] [MEGATRON_LM=DIR])

Each benchmark writes bench-results/<name>.json; its printed output (tables and verdicts) is kept beside it as
bench-results/<name>.txt. docs/benchmarks.md is then made from every bench-results/<name>.txt/.json present:
per benchmark the date, the machine, the command and everything it printed. Running a subset refreshes those
sections and keeps the others from their earlier runs (each section says its own date). The README copies its
figures from docs/benchmarks.md (tests/unit/test_benchmark_doc.py checks that every one is there).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "bench-results"
DOC = REPO / "docs" / "benchmarks.md"
# helpers, and parts of the textgen and train benchmarks that they run
SKIP = {
    "__init__.py",
    "common.py",
    "run_all.py",
    "decode_step.py",
    "baselines.py",
    "train_deepspeed.py",
    "ray_jobs.py",
}
# ANSI colours and tqdm redraws are kept out of the .txt; progress-bar lines out of the document
NOISE = re.compile(r"\x1b\[[0-9;]*m|.*\r(?!\n)")
PROGRESS = re.compile(r"\|\s*\d+/\d+ \[|^\s*warnings\.warn\(|UserWarning: ")


def run(name: str) -> int:
    """One benchmark as its own process: its output shown live and kept as bench-results/<name>.txt."""
    command = f"python tools/bench/{name}.py"
    print(f"\n=== bench: {name}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(HERE / f"{name}.py")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(NOISE.sub("", line))
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    print(f"=== {name}: {'ok' if rc == 0 else f'failed ({rc})'} in {seconds:.0f}s", flush=True)
    if os.environ.get("MEGATRON_LM") and name == "preprocess":
        command = f"MEGATRON_LM={os.environ['MEGATRON_LM']} {command}"
    RESULTS.mkdir(exist_ok=True)
    head = {"command": command, "returncode": rc, "seconds": round(seconds)}
    (RESULTS / f"{name}.txt").write_text(json.dumps(head) + "\n" + "".join(lines))
    return rc


def kept_sections(doc: str) -> dict[str, str]:
    """The ``## name`` sections of an existing docs/benchmarks.md, by name."""
    parts = re.split(r"^## (\S+)\n", doc, flags=re.M)
    return {name: f"## {name}\n{body}".rstrip("\n") + "\n" for name, body in zip(parts[1::2], parts[2::2])}


def render(previous: str = "") -> str:
    """docs/benchmarks.md from every benchmark's kept output; a benchmark with no output here (this checkout
    ran only some) keeps its section of ``previous``, the document as it was."""
    out = [
        "# Benchmarks",
        "",
        "Made by `make bench` (tools/bench/run_all.py) from what each benchmark printed; not edited by hand.",
        "Each benchmark runs megastack and its baselines in the same process tree on the same machine, so",
        "every ratio below compares figures measured minutes apart, never a figure from elsewhere.",
        "",
    ]
    kept = kept_sections(previous)
    have = {p.stem: p for p in RESULTS.glob("*.txt")} if RESULTS.is_dir() else {}
    for name in sorted(set(have) | set(kept)):
        if name not in have:
            out += [kept[name]]
            continue
        txt = have[name]
        head_line, _, printed = txt.read_text().partition("\n")
        head = json.loads(head_line)
        result = RESULTS / f"{name}.json"
        doc = json.loads(result.read_text()) if result.is_file() else {}
        m = doc.get("machine", {})
        status = "ok" if head["returncode"] == 0 else f"FAILED (exit {head['returncode']})"
        out += [
            f"## {name}",
            "",
            f"- run: {doc.get('date', 'no result file')}, {head['seconds']} s, {status}",
            f"- command: `{head['command']}`",
            f"- machine: {m.get('cpus', '?')} CPUs, {m.get('platform', '?')}, Python {m.get('python', '?')}, "
            f"torch {m.get('torch', '?')}, CUDA {'yes' if m.get('cuda') else 'no'}",
            f"- every figure: `bench-results/{name}.json`; what it printed:",
            "",
            "```",
            "\n".join(line for line in printed.rstrip().splitlines() if not PROGRESS.search(line)),
            "```",
            "",
        ]
    return "\n".join(out)


def main() -> int:
    names = sorted(p.stem for p in HERE.glob("*.py") if p.name not in SKIP)
    only = set(sys.argv[1:])
    unknown = only - set(names) - {"--render"}
    if unknown:
        print(f"no such benchmark: {', '.join(sorted(unknown))} (have: {', '.join(names)})", file=sys.stderr)
        return 2
    if only == {"--render"}:  # docs/benchmarks.md again from the kept output, nothing run
        only, names = set(), []
    failed = [name for name in names if (not only or name in only) and run(name)]
    DOC.write_text(render(DOC.read_text() if DOC.is_file() else ""))
    print(f"\nwrote {DOC.relative_to(REPO)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
