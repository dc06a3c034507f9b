"""The hf-deepspeed rows of the training benchmark (``python tools/bench/train.py --part deepspeed``).

Model: the training bench's ~21M-parameter Llama (vocab 49152 tied, hidden 256, ffn 1024, 8 layers), randomly
initialised and saved as an HF folder with SmolLM2's tokenizer; data: the example Alpaca records (repeated to
64), sequence 256, 2 ranks x 1 thread, micro batch 2, accumulation 2 (global batch 8), fp32.

Measured in one run, all on the same data and seed:
- plain torch DDP (``services.trainer.hf_deepspeed --engine ddp``) and ZeRO-1, 2, 3 (DeepSpeed, the same loop)
  under torchrun: median step time after warm-up, loss difference from DDP, and each rank's peak RSS
  (``ru_maxrss``: the process's whole footprint, Python and libraries included; the differences between
  stages are the sharded states);
- the ZeRO-2 job submitted through the trainer's Ray launcher to a real local Ray head, interleaved with
  ZeRO-2 under torchrun for ``rounds`` pairs: the launcher's overhead at steady state (median of the pairs).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from tools.bench.common import PY, REPO_ROOT, run_process, table
from tools.bench.ray_jobs import local_ray_head, run_job

SEQ, MICRO, GLOBAL, RANKS, STEPS, WARMUP = 256, 2, 8, 2, 12, 3
# the training bench's model (baselines-measured.md section 5), for train.py's megatron-core runs too
ANCHOR_LLAMA = {
    "vocab_size": 49152,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


def build(root: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shared.paths import DEFAULT_MODEL_DIR

    torch.manual_seed(0)
    cfg = LlamaConfig(**ANCHOR_LLAMA)
    hf = root / "hf"
    LlamaForCausalLM(cfg).save_pretrained(hf)
    for f in Path(DEFAULT_MODEL_DIR).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            (hf / f.name).write_bytes(f.read_bytes())
    records = (REPO_ROOT / "deploy/examples/data/alpaca-sample.jsonl").read_text().splitlines()
    data = root / "records.jsonl"
    data.write_text("\n".join((records * 4)[:64]) + "\n")
    return {
        "hf": str(hf),
        "data": str(data),
        "params": sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()),
    }


def spec(assets: dict, save_dir: Path, stage: int):
    from services.trainer.api import TrainSpec, validate

    s = TrainSpec(
        name=f"bench-zero{stage}",
        kind="hf-deepspeed",
        seq_length=SEQ,
        train_iters=STEPS,
        save_dir=str(save_dir),
        data_paths=(),
        hf_model=assets["hf"],
        data_files=(assets["data"],),
        dp=RANKS,
        micro_batch_size=MICRO,
        global_batch_size=GLOBAL,
        zero_stage=stage,
        lr=1e-4,
        save_interval=10**9,  # the final checkpoint only
        cpus_per_worker=1,
        num_threads=1,
    )
    validate(s)
    return s


def torchrun(s, engine: str, work: Path) -> dict:
    from shared.net import free_port

    spec_path, out = work / f"{Path(s.save_dir).name}.json", work / f"{Path(s.save_dir).name}-out.json"
    spec_path.write_text(s.to_json())
    argv = [PY, "-m", "torch.distributed.run", f"--nproc-per-node={RANKS}", f"--master-port={free_port()}"]
    argv += ["-m", "services.trainer.hf_deepspeed", str(spec_path), "--engine", engine, "--losses", str(out)]
    r = run_process(argv, env={"OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(r.output[-3000:])
    return json.loads(out.read_text())


def on_ray(s, work: Path) -> list[float]:
    """The job through the trainer's Ray launcher (as the trainer service submits it); its step times."""
    with local_ray_head(work) as address:
        run_job(s, work, address)
    rows = [json.loads(x) for x in (Path(s.save_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if not r.get("done")]


def steady(times: list[float]) -> float:
    return statistics.median(times[WARMUP:])


def bench_deepspeed(work: Path, rounds: int = 2) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    assets = build(work)
    print(
        f"hf-deepspeed: {assets['params'] / 1e6:.1f}M-parameter Llama, {RANKS} ranks x 1 thread", flush=True
    )
    runs: dict[str, dict] = {}
    for name, engine, stage in (("DDP", "ddp", 0), *((f"ZeRO-{z}", "deepspeed", z) for z in (1, 2, 3))):
        print(f"  {name} under torchrun ...", flush=True)
        runs[name] = torchrun(spec(assets, work / f"tr-{name}", stage), engine, work)
    pairs = []
    for r in range(rounds):
        print(
            f"  round {r + 1}/{rounds}: ZeRO-2 under torchrun, then as a megastack job on Ray ...", flush=True
        )
        direct = torchrun(spec(assets, work / f"pair-tr{r}", 2), "deepspeed", work)["step_times"]
        ray = on_ray(spec(assets, work / f"pair-ray{r}", 2), work)
        pairs.append({"torchrun_step_s": steady(direct), "ray_step_s": steady(ray)})
    ddp = runs["DDP"]
    rows = []
    for name, res in runs.items():
        diff = max(abs(a - b) for a, b in zip(res["losses"], ddp["losses"]))
        rows.append(
            [
                name,
                f"{steady(res['step_times']) * 1000:.0f}",
                " / ".join(f"{m:.0f}" for m in res["peak_rss_mb"]),
                f"{max(res['peak_rss_mb']) - max(ddp['peak_rss_mb']):+.0f}",
                "-" if name == "DDP" else f"{diff:.1e}",
            ]
        )
    print(
        f"\nsequence {SEQ}, micro batch {MICRO} x accumulation 2 x {RANKS} ranks, fp32, "
        f"steps {WARMUP + 1}..{STEPS}"
    )
    print(
        table(["engine (torchrun)", "step ms", "peak RSS MB per rank", "vs DDP MB", "max |loss - DDP|"], rows)
    )
    ratios = [p["ray_step_s"] / p["torchrun_step_s"] - 1 for p in pairs]
    overhead = statistics.median(ratios)
    print(
        "ZeRO-2 as a megastack job on Ray vs under torchrun, per round: "
        f"{', '.join(f'{100 * x:+.1f}%' for x in ratios)}"
        f"; median {100 * overhead:+.1f}% of step time"
    )
    return {
        "params": assets["params"],
        "runs": {
            k: {
                "median_step_s": steady(v["step_times"]),
                "peak_rss_mb_per_rank": v["peak_rss_mb"],
                "losses": v["losses"],
                "max_abs_loss_diff_vs_ddp": max(abs(a - b) for a, b in zip(v["losses"], ddp["losses"])),
            }
            for k, v in runs.items()
        },
        "ray_vs_torchrun_rounds": pairs,
        "ray_overhead_ratio": overhead,
    }
