"""eval compare's statistics: McNemar's exact test, the paired bootstrap, pairing by sample."""

from __future__ import annotations

import random

import pytest

from services.evaluator.significance import bootstrap_p, compare_samples, mcnemar_p


def test_mcnemar_exact_values():
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 10) == pytest.approx(2 / 1024)  # all 10 discordant pairs one way
    assert mcnemar_p(10, 0) == mcnemar_p(0, 10)
    assert mcnemar_p(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_bootstrap_tells_a_shift_from_noise():
    rng = random.Random(1)
    noise = [rng.gauss(0, 1) for _ in range(60)]
    assert bootstrap_p(noise) > 0.05
    assert bootstrap_p([x * 0.1 + 1 for x in noise]) < 0.001
    assert bootstrap_p([0.0] * 10) == 1.0 and bootstrap_p([0.5] * 10) == 0.0
    assert bootstrap_p(noise) == bootstrap_p(noise)  # seeded: the same inputs, the same p


def run(values: dict[int, float], task="t", answers=None) -> dict:
    return {
        (task, i): {"metrics": {"acc": v, "loss": v * 2.5}, "answer": (answers or {}).get(i, str(v))}
        for i, v in values.items()
    }


def test_samples_are_paired_by_doc_and_flips_listed():
    a = run({i: 0.0 for i in range(30)})
    b = run({i: (1.0 if i < 10 else 0.0) for i in range(30)} | {99: 1.0})  # 10 flips; doc 99 only in b
    by = {c.metric: c for c in compare_samples(a, b, max_flipped=3)}
    acc = by["acc"]
    assert acc.n == 30 and acc.test == "mcnemar" and acc.delta == pytest.approx(10 / 30)
    assert acc.p_value == pytest.approx(2 / 1024) and acc.significant
    assert [f["doc_id"] for f in acc.flipped] == [0, 1, 2] and acc.flipped[0]["answer_b"] == "1.0"
    assert by["loss"].test == "bootstrap" and by["loss"].significant  # 0 / 2.5: not a 0/1 metric
    one = {c.metric: c for c in compare_samples(a, run({i: (1.0 if i == 0 else 0.0) for i in range(30)}))}
    assert not one["acc"].significant and one["acc"].p_value == 1.0
