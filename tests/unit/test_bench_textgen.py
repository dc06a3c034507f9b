"""tools/bench/textgen.py's helpers: the percentile of a list, and the median run of a level's rounds."""

from __future__ import annotations

from tools.bench.textgen import median_run, pct


def test_the_median_run_is_the_run_whose_throughput_is_the_median():
    runs = [{"tokens_per_s": v, "round": i} for i, v in enumerate([310.0, 290.5, 402.0])]
    assert median_run(runs)["round"] == 0
    assert median_run(runs[1:2])["round"] == 1


def test_percentiles_pick_a_measured_value():
    values = [0.5, 0.1, 0.3, 0.2, 0.4]
    assert pct(values, 50) == 0.3
    assert pct(values, 99) == 0.5
    assert pct(values, 0) == 0.1
    assert pct([], 50) != pct([], 50)  # nan: nothing measured
