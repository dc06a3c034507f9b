"""Converter benchmark: megastack convert vs. a load-and-save process, on the default model.

    python tools/bench/convert.py [--repeats 3]

Baselines in the same run: ``cp`` of the safetensors file, and a Python process that imports torch,
loads the file with safetensors and saves it again (whole process). megastack is timed as whole
processes of ``megastack convert`` per direction: HF -> mcore, mcore -> HF, HF -> legacy (TP=3) and
legacy -> HF. SmolLM2-135M has 9 heads and 3 query groups, so TP=2 is impossible for it in Megatron
(TP must divide both); TP=3 is the nearest split. Parity comes from separate ``--verify`` runs.
Targets: each direction within 3x of the load-and-save process's time, with a lower peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from shared.paths import DEFAULT_MODEL_DIR
from tools.bench.common import PY, median_run, run_process, save, table

MEGASTACK = [PY, "-m", "tools.cli.main", "convert", "--no-progress"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    a = ap.parse_args()
    src = a.model / "model.safetensors"
    size = src.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        results = run(a.model, src, size, work, a.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results["baseline_load_save"]
    rows = [
        ["cp", f"{results['baseline_cp']['seconds']:.3f}", "-", "-", "-"],
        [
            "load+save (python)",
            f"{base['seconds']:.2f}",
            f"{base['peak_rss_bytes'] / 1e6:.0f}",
            "1.00",
            "1.00",
        ],
    ]
    for name, r in results["megastack"].items():
        rows.append(
            [
                name,
                f"{r['seconds']:.2f}",
                f"{r['peak_rss_bytes'] / 1e6:.0f}",
                f"{r['time_ratio']:.2f}",
                f"{r['rss_ratio']:.2f}",
            ]
        )
    print(f"model: {a.model} ({size / 1e6:.0f} MB safetensors), median of {a.repeats} runs, whole processes")
    print(table(["run", "seconds", "peak RSS MB", "time / load+save", "RSS / load+save"], rows))
    print("\nparity (--verify):")
    print(
        table(
            ["direction", "max |logit diff|", "top-1 agreement", "weights exact"],
            [
                [k, f"{v['max_abs_logit_diff']:.3g}", f"{100 * v['top1_agreement']:.1f}%", v["weights_exact"]]
                for k, v in results["parity"].items()
            ],
        )
    )
    ok = all(r["time_ratio"] <= 3.0 and r["rss_ratio"] < 1.0 for r in results["megastack"].values())
    print(f"\ntargets (time <= 3x, RSS below load+save): {'met' if ok else 'NOT met'}")
    save("convert", {**results, "model_bytes": size, "targets_met": ok})
    return 0


def run(model: Path, src: Path, size: int, work: Path, repeats: int) -> dict:
    out: dict = {}

    def clean(*dirs: Path):
        def go():
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
                d.unlink(missing_ok=True) if d.is_file() else None

        return go

    out["baseline_cp"] = median_run(["cp", str(src), str(work / "copy.safetensors")], repeats)
    code = (
        "import sys, torch; from safetensors.torch import load_file, save_file; "
        "save_file(load_file(sys.argv[1]), sys.argv[2])"
    )
    out["baseline_load_save"] = median_run(
        [PY, "-c", code, str(src), str(work / "resaved.safetensors")], repeats
    )
    steps = {
        "hf -> mcore": (model, work / "mcore", ["--target-format", "mcore"]),
        "mcore -> hf": (work / "mcore", work / "hf_from_mcore", ["--target-format", "hf"]),
        "hf -> legacy tp3": (
            model,
            work / "legacy",
            ["--target-format", "legacy", "--target-tensor-parallel-size", "3"],
        ),
        "legacy tp3 -> hf": (work / "legacy", work / "hf_from_legacy", ["--target-format", "hf"]),
    }
    base = out["baseline_load_save"]
    out["megastack"] = {}
    for name, (load, save_dir, extra) in steps.items():
        r = median_run(
            MEGASTACK + ["--load-dir", str(load), "--save-dir", str(save_dir), *extra, "--overwrite"],
            repeats,
            before=clean(save_dir),
        )
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["rss_ratio"] = r["peak_rss_bytes"] / base["peak_rss_bytes"]
        r.pop("output")
        out["megastack"][name] = r
    out["round_trip_identical"] = (work / "hf_from_mcore" / "model.safetensors").read_bytes() == (
        work / "hf_from_legacy" / "model.safetensors"
    ).read_bytes()
    out["parity"] = {}
    for name, (load, save_dir, extra) in {
        "hf -> mcore": steps["hf -> mcore"],
        "legacy tp3 -> hf": steps["legacy tp3 -> hf"],
    }.items():
        target = work / f"verify-{save_dir.name}"
        r = run_process([PY, "-c", PARITY, str(load), str(target), extra[1]])
        if r.returncode != 0:
            raise RuntimeError(r.output[-2000:])
        out["parity"][name] = json.loads(r.output.strip().splitlines()[-1])
    for k in ("baseline_cp", "baseline_load_save"):
        out[k].pop("output")
    return out


PARITY = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from services.converter.api import ConvertSpec, convert
load, save, fmt = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
spec = ConvertSpec(load_dir=load, save_dir=save, target_format=fmt, verify=True)
r = convert(spec)
print(json.dumps(r.parity))
"""

if __name__ == "__main__":
    sys.exit(main())
