"""The engine's decode step in process (no server): ms per step at 1 and 16 sequences, three ways: the
layers composed of PyTorch ops with ``F.linear``; composed with the compiled kernels the engine picks
(``llm.devices``: matmul, RMSNorm, paged attention); and as the engine runs it, the whole step in one compiled
call where it covers the model (``services.textgen.fused``). Against the memory-bandwidth roofline measured in
the same run (a batch-1 step reads every weight once).

Run by ``tools/bench/textgen.py``; alone: ``python tools/bench/decode_step.py [--model DIR]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from shared.paths import DEFAULT_MODEL_DIR
from tools.bench.common import table

PROMPT = 32
STEPS = 24


def read_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """GB/s of summing a ``mb`` MB float32 buffer (a read-only stream, like a decode step's weight reads)."""
    import torch

    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device="cpu")
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def _step_ms(m, cache, batch: int) -> float:
    import torch

    cpu = torch.device("cpu")
    tables = torch.arange(1, 1 + 8 * batch, device=cpu).view(batch, 8)  # 8 blocks of 16: 128 positions
    g = torch.Generator(device=cpu).manual_seed(0)
    prompts = torch.randint(0, 1000, (batch, PROMPT), generator=g, device=cpu)
    with torch.inference_mode():
        m.prefill(prompts, [0] * batch, [PROMPT] * batch, tables, cache)
        tokens = torch.full((batch,), 5, device=cpu)
        times = []
        for i in range(STEPS + 3):
            pos = torch.full((batch,), PROMPT + i, device=cpu)
            t0 = time.perf_counter()
            m.logits(m.decode(tokens, pos, tables, cache)).argmax(-1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]) * 1000


def measure(model_dir: Path, rounds: int = 3) -> dict:
    """Median ms/step per (dtype, kernel, batch) over ``rounds`` interleaved rounds, the bandwidth, the
    weights' bytes and the roofline."""
    import torch
    import torch.nn.functional as F

    from llm import thin_linear
    from llm.checkpoints import open_checkpoint
    from services.textgen.api import DecoderLM, PagedKVCache

    reader = open_checkpoint(model_dir)
    cpu = torch.device("cpu")
    out: dict = {"rows": [], "bandwidth_gbs": [], "threads": torch.get_num_threads()}
    out["kernel_isa"] = thin_linear.vector_isa()
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = DecoderLM(reader.arch, reader.canonical_tensors(), dtype=dtype, device=cpu, max_len=2048)
        cache = PagedKVCache(reader.arch, num_blocks=1 + 8 * 16, block_size=16, dtype=dtype, device=cpu)
        models[dtype] = (m, cache, m.linear, m.fused)
    runs = [
        (torch.float32, "F.linear"),
        (torch.float32, "kernels"),
        (torch.float32, "engine"),
        (torch.bfloat16, "kernels"),
        (torch.bfloat16, "engine"),
    ]
    samples: dict = {(d, k, b): [] for d, k in runs for b in (1, 16)}
    for _ in range(rounds):
        out["bandwidth_gbs"].append(read_bandwidth_gbs())
        for dtype, kernel in runs:
            m, cache, chosen, fused = models[dtype]
            m.linear = F.linear if kernel == "F.linear" else chosen
            m.fused = fused if kernel == "engine" else None
            for batch in (1, 16):
                samples[(dtype, kernel, batch)].append(_step_ms(m, cache, batch))
    bw = statistics.median(out["bandwidth_gbs"])
    for dtype, kernel in runs:
        m, _, chosen, fused = models[dtype]
        name = {
            "F.linear": "composed, F.linear",
            "kernels": "composed, compiled kernels",
            "engine": "one compiled step" if fused is not None else "composed, compiled kernels",
        }[kernel]
        nbytes = m.num_parameters() * torch.empty((), dtype=dtype, device=cpu).element_size()
        roof = nbytes / (bw * 1e9) * 1000
        b1 = statistics.median(samples[(dtype, kernel, 1)])
        b16 = statistics.median(samples[(dtype, kernel, 16)])
        out["rows"].append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "kernel": kernel,
                "kernel_function": name,
                "batch1_ms": b1,
                "batch16_ms": b16,
                "weights_mb": nbytes / 1e6,
                "roofline_ms": roof,
                "roofline_share": roof / b1,
            }
        )
    out["read_bandwidth_gbs"] = bw
    return out


# per-token targets of issue 18 for one client on this machine
TARGET_MS = {"float32": 20.0, "bfloat16": 12.0}


def report(res: dict) -> list[str]:
    rows = [
        [
            r["dtype"],
            f"{r['kernel']} ({r['kernel_function']})",
            f"{r['batch1_ms']:.1f}",
            f"{r['batch16_ms']:.1f}",
            f"{r['weights_mb']:.0f}",
            f"{r['roofline_ms']:.1f}",
            f"{r['roofline_share']:.0%}",
        ]
        for r in res["rows"]
    ]
    lines = [
        f"\ndecode step in process (no server), {res['threads']} threads, prompt {PROMPT} tokens, median of "
        f"{STEPS} steps, median of {len(res['bandwidth_gbs'])} interleaved rounds; compiled kernels built "
        f"for {res.get('kernel_isa') or 'none'}",
        table(
            ["dtype", "path", "B=1 ms", "B=16 ms", "weights MB", "roofline ms", "B=1 at roofline"],
            rows,
        ),
        f"read bandwidth (sum of a 512 MB buffer, same run): {res['read_bandwidth_gbs']:.1f} GB/s; the "
        "roofline is the weights' bytes at that rate",
    ]
    base = next(r for r in res["rows"] if r["kernel"] == "F.linear")
    for kernel in ("kernels", "engine"):
        eng = next(r for r in res["rows"] if r["kernel"] == kernel and r["dtype"] == base["dtype"])
        lines.append(
            f"float32 {eng['kernel_function']} vs composed with F.linear: "
            f"{base['batch1_ms'] / eng['batch1_ms']:.2f}x at B=1, "
            f"{base['batch16_ms'] / eng['batch16_ms']:.2f}x at B=16"
        )
    for r in res["rows"]:
        if r["kernel"] != "engine":
            continue
        t = TARGET_MS[r["dtype"]]
        lines.append(
            f"1 sequence, {r['dtype']}: {r['batch1_ms']:.1f} ms per step (target <= {t:.0f} ms: "
            f"{'met' if r['batch1_ms'] <= t else 'NOT met'}; "
            f"this host's roofline is {r['roofline_ms']:.1f} ms)"
        )
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    a = ap.parse_args()
    print("\n".join(report(measure(a.model))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
