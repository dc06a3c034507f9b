"""Is a score change signal or noise? Paired comparisons of two runs over the samples both scored.

Per-sample metric values come from each run's ``samples.jsonl`` (written by the harness: task, doc_id, the
numeric per-sample metrics and the answer). For a 0/1 metric (accuracy, exact match) the test is McNemar's
exact test on the discordant pairs; for any other numeric metric a paired bootstrap of the mean difference
(seeded, so the same inputs give the same p-value). The standard error is that of the paired differences.
Pure Python, no numpy: a few thousand samples at most.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOOTSTRAP_ITERS = 10_000
ALPHA = 0.05


@dataclass
class MetricComparison:
    task: str
    metric: str
    n: int  # samples scored in both runs
    mean_a: float
    mean_b: float
    delta: float  # mean_b - mean_a over the shared samples
    stderr: float  # of the paired differences' mean
    p_value: float
    test: str  # mcnemar | bootstrap
    flipped: list[dict[str, Any]] = field(default_factory=list)  # samples whose value changed

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def read_samples(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(task, doc_id) -> {"metrics": {...}, "answer": str} from a samples.jsonl."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            doc = json.loads(line)
            out[(doc["task"], int(doc["doc_id"]))] = doc
    return out


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b pairs went 1 -> 0, c went 0 -> 1 (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_p(diffs: list[float], iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> float:
    """Two-sided paired-bootstrap p-value of mean(diffs) != 0: resample the differences centred on 0 and
    count means at least as far from 0 as the observed one."""
    n = len(diffs)
    if n == 0:
        return 1.0
    observed = sum(diffs) / n
    if all(d == diffs[0] for d in diffs):
        return 1.0 if observed == 0 else 0.0
    centred = [d - observed for d in diffs]
    rng = random.Random(seed)
    extreme = 0
    for _ in range(iters):
        m = sum(rng.choice(centred) for _ in range(n)) / n
        if abs(m) >= abs(observed) - 1e-15:
            extreme += 1
    return (extreme + 1) / (iters + 1)


def compare_samples(
    a: dict[tuple[str, int], dict[str, Any]],
    b: dict[tuple[str, int], dict[str, Any]],
    *,
    max_flipped: int = 0,
) -> list[MetricComparison]:
    """Every (task, numeric metric) that both runs scored per sample, compared over their shared samples."""
    shared = sorted(set(a) & set(b))
    metrics: dict[tuple[str, str], None] = {}
    for key in shared:
        for m, v in a[key]["metrics"].items():
            if _number(v) and _number(b[key]["metrics"].get(m)):
                metrics[(key[0], m)] = None
    out = []
    for task, m in metrics:
        keys = [
            k
            for k in shared
            if k[0] == task and _number(a[k]["metrics"].get(m)) and _number(b[k]["metrics"].get(m))
        ]
        va = [float(a[k]["metrics"][m]) for k in keys]
        vb = [float(b[k]["metrics"][m]) for k in keys]
        diffs = [y - x for x, y in zip(va, vb)]
        n = len(diffs)
        mean_d = sum(diffs) / n
        var = sum((d - mean_d) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
        binary = all(v in (0.0, 1.0) for v in va + vb)
        if binary:
            p, test = (
                mcnemar_p(sum(x > y for x, y in zip(va, vb)), sum(y > x for x, y in zip(va, vb))),
                "mcnemar",
            )
        else:
            p, test = bootstrap_p(diffs), "bootstrap"
        flipped = [
            {
                "doc_id": k[1],
                "a": x,
                "b": y,
                "answer_a": a[k].get("answer", ""),
                "answer_b": b[k].get("answer", ""),
            }
            for k, x, y in zip(keys, va, vb)
            if x != y
        ][:max_flipped]
        out.append(
            MetricComparison(
                task=task,
                metric=m,
                n=n,
                mean_a=sum(va) / n,
                mean_b=sum(vb) / n,
                delta=mean_d,
                stderr=math.sqrt(var / n) if n > 1 else 0.0,
                p_value=p,
                test=test,
                flipped=flipped,
            )
        )
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
