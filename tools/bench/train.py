"""Training benchmark: megastack on Ray vs. the same training script under torchrun; MFU on this CPU; async
vs sync saves.

    python tools/bench/train.py [--iters 14] [--rounds 3] [--saves 4] [--part all|launcher|checkpoint|layouts]

Model: the anchor of baselines-measured.md section 5, a ~21M-parameter Llama (vocab 49152 tied,
hidden 256, ffn 1024, 8 layers, 4 heads), sequence 512, micro batch 4 (2048 tokens a step), fp32, one
rank with 2 threads. Both runs execute ``services.trainer.train`` on the same data and seed: (a) via
``torchrun`` directly, (b) submitted through the trainer's Ray launcher to a real local Ray head.
The two alternate for --rounds rounds (the host's speed drifts by +-10% over minutes), once more with
torchrun beside the idle head after the first Ray run, and the same model and step in plain HF
transformers, measured in the same run. Step times: the steps after warm-up (each run's
metrics.jsonl); the overhead is the median of the per-round ratios. Also sampled: how long the rank's
compute threads wait runnable while other processes hold the CPU (schedstat). Model FLOPs per
token = 6 N + 12 L S h; MFU = achieved FLOP/s / the fp32 matmul peak measured here (torch.mm 2048^2).
Checkpoints: the same job (save every 2 steps) with synchronous and asynchronous saves, alternating, in
the same run; the figure is what a save blocks the step loop (median over the saves after each run's
first). Layouts: TP=2 and DP=2 (2 ranks x 1 thread) against 1 rank x 2 threads on the same two cores.
Targets: Ray launch overhead < 5% of step time at steady state; report MFU; an async save blocks
at most 25% of a sync one. hf-deepspeed jobs (``--part deepspeed``, tools/bench/train_deepspeed.py):
ZeRO-1/2/3 against DDP (step time, per-rank peak memory, loss difference), the ZeRO-2 job on Ray vs torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tools.bench.common import PY, run_process, save, table
from tools.bench.ray_jobs import local_ray_head, run_job
from tools.bench.train_deepspeed import ANCHOR_LLAMA

WARMUP = 4
SEQ, MICRO_BATCH = 512, 4


def matmul_peak(threads: int = 2) -> float:
    code = f"""
import time, torch
torch.set_num_threads({threads})
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
for _ in range(3): a @ b
ts = []
for _ in range(10):
    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
ts.sort(); print(2 * 2048 ** 3 / ts[len(ts) // 2])
"""
    return float(run_process([PY, "-c", code]).output.strip().splitlines()[-1])


def hf_anchor(steps: int = 5, warmup: int = 2, threads: int = 2) -> float:
    """The same model and step in plain HF transformers + torch AdamW (random tokens), measured here in this
    run: median seconds per step (forward, backward, optimizer step, zero_grad) after ``warmup`` steps."""
    code = f"""
import statistics, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads({threads}); torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                  tie_word_embeddings=True, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randint(0, 49152, ({MICRO_BATCH}, {SEQ}))
times = []
for i in range({warmup + steps}):
    t = time.perf_counter()
    model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()
    times.append(time.perf_counter() - t)
print(statistics.median(times[{warmup}:]))
"""
    r = run_process([PY, "-c", code], env={"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    if r.returncode:
        raise RuntimeError(r.output[-2000:])
    return float(r.output.strip().splitlines()[-1])


def build_assets(root: Path) -> dict:
    from transformers import LlamaConfig

    from shared.paths import DEFAULT_MODEL_DIR
    from tools.assets import ensure_asset
    from tools.preprocess.pipeline import Options, run

    cfg = LlamaConfig(**ANCHOR_LLAMA)
    arch_dir = root / "arch"
    arch_dir.mkdir()
    doc = cfg.to_dict()
    doc["architectures"] = ["LlamaForCausalLM"]
    (arch_dir / "config.json").write_text(json.dumps(doc))
    corpus = root / "corpus.jsonl"
    blocks = [b["text"] for d in json.loads(ensure_asset("markov-corpus").read_text()) for b in d["blocks"]]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in blocks * 2))
    run(
        Options(
            input=corpus,
            output_prefix=str(root / "data"),
            tokenizer_name_or_path=DEFAULT_MODEL_DIR,
            append_eod=True,
        )
    )
    return {
        "arch": str(arch_dir),
        "tokenizer": str(DEFAULT_MODEL_DIR),
        "data": str(root / "data_text_document"),
    }


def spec(assets: dict, save_dir: Path, iters: int):
    from services.trainer.api import TrainSpec, validate

    s = TrainSpec(
        name="bench",
        kind="pretrain",
        seq_length=SEQ,
        train_iters=iters,
        save_dir=str(save_dir),
        data_paths=((assets["data"], 1.0),),
        architecture=assets["arch"],
        tokenizer=assets["tokenizer"],
        micro_batch_size=MICRO_BATCH,
        global_batch_size=MICRO_BATCH,
        lr=1e-4,
        log_interval=1,
        save_interval=10**9,
        cpus_per_worker=2,
        num_threads=2,
    )
    validate(s)
    return s


def step_times(save_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if not r.get("done") and r["step"] > WARMUP]


class RunQueueSampler:
    """How long the rank's two compute threads (the busiest) sat runnable but off the CPU, in ms per
    second, over the steady-state steps: /proc/<pid>/task/*/schedstat. Other processes on the machine
    (Ray's daemons, the launcher) cause it; the host's own noise, which moves step times by +-10% here
    from minute to minute, does not, so this shows what the launcher adds more steadily than step times do."""

    def __init__(self, save_dir: Path) -> None:
        self.save_dir, self.first, self.last = save_dir, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _rank_pid() -> str | None:
        for pid in os.listdir("/proc"):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if pid.isdigit() else []
            except OSError:
                continue
            if b"services.trainer.train" in argv[1:4] and b"-m" in argv[1:3]:
                return pid
        return None

    def _loop(self) -> None:
        pid, threads = None, None
        while not self._stop.wait(0.5):
            pid = pid or self._rank_pid()
            if pid is None:
                continue
            try:
                stats = {
                    t: tuple(int(x) for x in Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[:2])
                    for t in os.listdir(f"/proc/{pid}/task")
                }
                done = len((self.save_dir / "metrics.jsonl").read_text().splitlines())
            except OSError:
                pid = None if self.last else pid
                continue
            if done <= WARMUP:
                continue
            threads = threads or sorted(stats, key=lambda t: -stats[t][0])[:2]
            sample = (time.monotonic(), sum(stats[t][1] for t in threads if t in stats))
            self.first = self.first or sample
            self.last = sample

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        if not self.first or self.last[0] - self.first[0] < 2:
            return None
        return (self.last[1] - self.first[1]) / 1e6 / (self.last[0] - self.first[0])


def run_torchrun(s, spec_path: Path) -> tuple[float, float | None]:
    from llm.mcore.dist import free_port

    sampler = RunQueueSampler(Path(s.save_dir))
    t0 = time.perf_counter()
    r = run_process(
        [
            PY,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={s.world_size}",
            f"--master-port={free_port()}",
            "-m",
            "services.trainer.train",
            str(spec_path),
        ],
        env={"OMP_NUM_THREADS": str(s.num_threads or 2)},
    )
    wall, rq = time.perf_counter() - t0, sampler.stop()
    if r.returncode:
        raise RuntimeError(r.output[-3000:])
    return wall, rq


def run_ray(s, work: Path, beside=None) -> tuple[float, float | None, Any]:
    """The job through the trainer's Ray launcher; then ``beside()`` while the (now idle) head still runs."""
    with local_ray_head(work) as address:
        sampler = RunQueueSampler(Path(s.save_dir))
        try:
            took = run_job(s, work, address)
        finally:
            rq = sampler.stop()
        return took, rq, beside() if beside is not None else None


def bench_checkpoints(assets: dict, work: Path, saves: int) -> dict:
    """Sync and async checkpoints of the same job in the same run: what each save blocks the step loop (model,
    Adam state and the rest; ``<save_dir>/megastack-saves.jsonl``), alternating sync / async twice."""
    import dataclasses

    from services.trainer.api import SAVES_FILE

    out: dict[str, list[dict]] = {"sync": [], "async": []}
    for r in range(2):
        for mode in ("sync", "async"):
            name = f"ckpt-{mode}{r}"
            s = dataclasses.replace(
                spec(assets, work / name, 2 * saves), save_interval=2, async_save=mode == "async", keep_last=1
            )
            path = work / f"{name}.json"
            path.write_text(s.to_json())
            print(f"checkpoints, round {r + 1}/2: {mode} ...", flush=True)
            run_torchrun(s, path)
            out[mode] += [json.loads(x) for x in (work / name / SAVES_FILE).read_text().splitlines()]
            shutil.rmtree(work / name, ignore_errors=True)
    return out


def bench_layouts(assets: dict, work: Path, iters: int) -> dict:
    """TP=2 and DP=2 (2 ranks x 1 thread) against 1 rank x 2 threads on the same cores: tokens/s per layout
    and the scaling efficiency (tokens/s over the single rank's; DP=2 trains twice the tokens per step)."""
    import dataclasses

    out = {}
    for name, tp, dp in (
        ("1 rank x 2 threads", 1, 1),
        ("TP=2 (2 ranks x 1 thread)", 2, 1),
        ("DP=2 (2 ranks x 1 thread)", 1, 2),
    ):
        key = f"layout-tp{tp}-dp{dp}"
        s = spec(assets, work / key, iters)
        threads = 2 if tp * dp == 1 else 1
        s = dataclasses.replace(
            s, tp=tp, dp=dp, global_batch_size=MICRO_BATCH * dp, cpus_per_worker=threads, num_threads=threads
        )
        path = work / f"{key}.json"
        path.write_text(s.to_json())
        print(f"layouts: {name} ...", flush=True)
        run_torchrun(s, path)
        step = statistics.median(step_times(work / key))
        out[name] = {"tp": tp, "dp": dp, "median_step_s": step, "tokens_per_s": MICRO_BATCH * dp * SEQ / step}
        shutil.rmtree(work / key, ignore_errors=True)
    base = out["1 rank x 2 threads"]["tokens_per_s"]
    for v in out.values():
        v["scaling_efficiency"] = v["tokens_per_s"] / base
    print(
        table(
            ["layout", "step ms", "tokens/s", "vs 1 rank"],
            [
                [
                    k,
                    f"{v['median_step_s'] * 1000:.0f}",
                    f"{v['tokens_per_s']:.0f}",
                    f"{v['scaling_efficiency']:.2f}",
                ]
                for k, v in out.items()
            ],
        )
    )
    return out


def report_checkpoints(ck: dict, arch) -> dict:
    def med(mode: str, key: str, later: bool) -> float:
        rows = [
            x for x in ck[mode] if not later or x["iteration"] > 2
        ]  # iteration 2: the first save of a run
        return statistics.median(x[key] for x in rows)

    sync_b, async_b = med("sync", "blocked_s", True), med("async", "blocked_s", True)
    rows = [
        [
            mode,
            f"{med(mode, 'blocked_s', False):.2f}",
            f"{med(mode, 'blocked_s', True):.2f}",
            f"{med(mode, 'written_s', True):.2f}",
        ]
        for mode in ("sync", "async")
    ]
    state_mb = arch.num_parameters() * 4 * 3 / 1e6  # fp32 weights + Adam's two moments
    print(
        f"\ncheckpoints: {arch.num_parameters() / 1e6:.1f}M params, ~{state_mb:.0f} MB of model and "
        "optimizer state per save, "
        f"{len(ck['sync'])} saves per mode over 2 alternating runs"
    )
    print(table(["save", "blocked s (all saves)", "blocked s (after the first)", "published after s"], rows))
    ratio = async_b / sync_b
    print(
        f"async saves block the step loop {100 * ratio:.0f}% of a sync save (target <= 25%): "
        f"{'met' if ratio <= 0.25 else 'NOT met'}"
    )
    return {
        "saves": ck,
        "sync_blocked_s": sync_b,
        "async_blocked_s": async_b,
        "async_over_sync": ratio,
        "target_met": ratio <= 0.25,
        "state_mb": state_mb,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=14, help=f"steps per run (the first {WARMUP} are warm-up)")
    ap.add_argument(
        "--rounds", type=int, default=3, help="torchrun / Ray pairs, interleaved (the host drifts by minutes)"
    )
    ap.add_argument("--saves", type=int, default=4, help="checkpoints per run in the sync / async comparison")
    ap.add_argument(
        "--part",
        choices=("all", "launcher", "checkpoint", "layouts", "deepspeed"),
        default="all",
        help="launcher: Ray vs torchrun, MFU and the HF anchor; checkpoint: async vs sync saves; layouts: "
        "TP=2, DP=2; deepspeed: hf-deepspeed jobs, ZeRO-1/2/3 vs DDP and on Ray vs torchrun",
    )
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rounds = []
    try:
        assets = build_assets(work)
        from services.trainer.api import resolve_arch

        def prepared(name: str):
            s = spec(assets, work / name, a.iters)
            (work / f"{name}.json").write_text(s.to_json())
            return s, work / f"{name}.json"

        arch = resolve_arch(prepared("probe")[0])[0]
        if a.part in ("all", "deepspeed"):
            from tools.bench.train_deepspeed import bench_deepspeed

            deepspeed = bench_deepspeed(work / "deepspeed", rounds=a.rounds)
            if a.part == "deepspeed":
                save("train", {"deepspeed": deepspeed})
                return 0
        if a.part in ("all", "checkpoint"):
            checkpoints = report_checkpoints(bench_checkpoints(assets, work, a.saves), arch)
            if a.part == "checkpoint":
                save("train", {"checkpoint": checkpoints})
                return 0
        if a.part in ("all", "layouts"):
            layouts = bench_layouts(assets, work, a.iters)
            if a.part == "layouts":
                save("train", {"layouts": layouts})
                return 0
        peak = matmul_peak()
        print(f"fp32 matmul peak (2048^2, 2 threads): {peak / 1e9:.1f} GFLOP/s", flush=True)
        print("HF transformers anchor (same model and step, plain PyTorch loop) ...", flush=True)
        hf_step = hf_anchor()
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}: torchrun ...", flush=True)
            s_t, p_t = prepared(f"torchrun{r}")
            wall_t, rq_t = run_torchrun(s_t, p_t)
            print(
                f"round {r + 1}/{a.rounds}: megastack on "
                f"Ray{' (then torchrun beside the idle head)' if r == 0 else ''} ...",
                flush=True,
            )
            s_r, _ = prepared(f"ray{r}")
            beside_run = prepared("beside") if r == 0 else None
            wall_r, rq_r, beside = run_ray(
                s_r, work, beside=(lambda b=beside_run: run_torchrun(*b)) if beside_run else None
            )
            rounds.append(
                {
                    "torchrun": {
                        "step_times": step_times(work / f"torchrun{r}"),
                        "wall_s": wall_t,
                        "runqueue_ms_per_s": rq_t,
                    },
                    "ray": {
                        "step_times": step_times(work / f"ray{r}"),
                        "wall_s": wall_r,
                        "runqueue_ms_per_s": rq_r,
                    },
                }
            )
            if beside is not None:
                rounds[0]["beside"] = {
                    "step_times": step_times(work / "beside"),
                    "runqueue_ms_per_s": beside[1],
                }
            med = {k: statistics.median(rounds[-1][k]["step_times"]) for k in ("torchrun", "ray")}
            print(
                f"  torchrun {med['torchrun'] * 1000:.0f} ms/step, Ray {med['ray'] * 1000:.0f} ms/step "
                f"({100 * (med['ray'] / med['torchrun'] - 1):+.1f}%)",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from services.trainer.api import flops_per_token

    tokens = MICRO_BATCH * SEQ
    per_token = flops_per_token(arch, SEQ)

    def pooled(kind: str) -> list[float]:
        return [t for r in rounds if kind in r for t in r[kind]["step_times"]]

    def mean_rq(kind: str) -> float | None:
        vals = [
            r[kind]["runqueue_ms_per_s"]
            for r in rounds
            if kind in r and r[kind]["runqueue_ms_per_s"] is not None
        ]
        return statistics.mean(vals) if vals else None

    med = {k: statistics.median(pooled(k)) for k in ("torchrun", "ray", "beside")}
    paired = [
        statistics.median(r["ray"]["step_times"]) / statistics.median(r["torchrun"]["step_times"]) - 1
        for r in rounds
    ]
    overhead = statistics.median(paired)
    daemons = med["beside"] / med["torchrun"] - 1
    rq = {k: mean_rq(k) for k in ("torchrun", "ray", "beside")}
    rows = []
    for name, key in (
        ("torchrun", "torchrun"),
        ("megastack on Ray", "ray"),
        ("torchrun beside an idle Ray head", "beside"),
    ):
        flops = per_token * tokens / med[key]
        walls = [r[key]["wall_s"] for r in rounds if key in r and "wall_s" in r[key]]
        rows.append(
            [
                name,
                f"{med[key] * 1000:.0f}",
                f"{tokens / med[key]:.0f}",
                f"{flops / 1e9:.1f}",
                f"{100 * flops / peak:.1f}%",
                f"{rq[key]:.0f}" if rq[key] is not None else "-",
                f"{statistics.mean(walls):.1f}" if walls else "-",
            ]
        )
    print(
        f"\nmodel {arch.num_parameters() / 1e6:.1f}M params, seq {SEQ}, {tokens} tokens/step, fp32, 1 rank "
        "x 2 threads; "
        f"{a.rounds} interleaved rounds, median of steps {WARMUP + 1}..{a.iters} of each run"
    )
    print(
        table(
            ["launcher", "step ms", "tokens/s", "GFLOP/s", "MFU", "run-queue ms/s", "wall s (incl. start)"],
            rows,
        )
    )
    alone = [statistics.median(r["torchrun"]["step_times"]) for r in rounds]
    noise = max(alone) / min(alone) - 1
    print(
        f"\nper round, Ray vs torchrun: {', '.join(f'{100 * p:+.1f}%' for p in paired)}; the host's own "
        "drift: torchrun alone "
        f"ranged {min(alone) * 1000:.0f}-{max(alone) * 1000:.0f} ms/step over the rounds ({100 * noise:.0f}%)"
    )
    print(
        f"Ray launch overhead at steady state (median of the paired rounds): {100 * overhead:+.1f}% of step "
        "time "
        f"(target < 5%): {'met' if overhead < 0.05 else 'NOT met'}"
    )
    print(
        f"of which the mere presence of Ray's daemons on this {os.cpu_count()}-core machine (torchrun "
        "beside an idle head, "
        f"round 1): {100 * daemons:+.1f}%"
    )
    if rq["torchrun"] is not None and rq["ray"] is not None:
        print(
            f"compute threads kept off the CPU by other processes: {rq['torchrun']:.0f} ms/s under "
            f"torchrun, {rq['ray']:.0f} ms/s "
            f"under Ray (+{(rq['ray'] - rq['torchrun']) / 20:.1f}% of the 2 threads' time)"
        )
    hf_flops = per_token * tokens / hf_step
    print(
        f"HF transformers, same model and step, measured in this run: {hf_step:.3f} s/step, "
        f"{tokens / hf_step:.0f} tokens/s, "
        f"{100 * hf_flops / peak:.1f}% MFU; megastack under torchrun takes {med['torchrun'] / hf_step:.2f}x "
        "its step time "
        f"(baselines-measured.md recorded 2.179 s/step for it on this machine)"
    )
    save(
        "train",
        {
            "matmul_peak_flops": peak,
            "flops_per_token": per_token,
            "tokens_per_step": tokens,
            "rounds": rounds,
            "torchrun": {
                "median_step_s": med["torchrun"],
                "mfu": per_token * tokens / med["torchrun"] / peak,
                "runqueue_ms_per_s": rq["torchrun"],
            },
            "ray": {
                "median_step_s": med["ray"],
                "mfu": per_token * tokens / med["ray"] / peak,
                "runqueue_ms_per_s": rq["ray"],
            },
            "torchrun_beside_idle_ray_head": {
                "median_step_s": med["beside"],
                "runqueue_ms_per_s": rq["beside"],
            },
            "ray_overhead_ratio_per_round": paired,
            "torchrun_spread_between_rounds": noise,
            "ray_overhead_ratio": overhead,
            "ray_daemons_presence_ratio": daemons,
            "target_met": overhead < 0.05,
            **(
                {"checkpoint": checkpoints, "layouts": layouts, "deepspeed": deepspeed}
                if a.part == "all"
                else {}
            ),
            "hf_anchor_measured": {
                "step_s": hf_step,
                "tokens_per_s": tokens / hf_step,
                "mfu": hf_flops / peak,
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
