"""Prometheus metrics of the converter (prefix megastack_converter_)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS = Counter("megastack_converter_jobs_total", "Conversions finished, by final state.", ["state"])
DURATION = Histogram(
    "megastack_converter_convert_duration_seconds",
    "Conversion time, by target format.",
    ["target"],
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
BYTES = Counter("megastack_converter_convert_bytes_total", "Bytes written by conversions.")
PEAK_RSS = Gauge("megastack_converter_convert_peak_rss_bytes", "Peak RSS of the last conversion's worker.")
LOGIT_DIFF = Gauge(
    "megastack_converter_roundtrip_max_abs_logit_diff", "Max |logit diff| of the last verified conversion."
)
TOP1 = Gauge(
    "megastack_converter_roundtrip_top1_agreement_ratio", "Top-1 agreement of the last verified conversion."
)
for state in ("succeeded", "failed", "cancelled"):
    JOBS.labels(state)
