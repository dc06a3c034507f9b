"""Prometheus metrics of the text-generation engine (names mirror vLLM/TGI, prefix megastack_textgen_).

One "request" here is one sequence: a Generate call with N prompts counts N.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS_S

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ITL_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)

NUM_WAITING = Gauge("megastack_textgen_num_requests_waiting", "Sequences queued, not yet prefilled.")
NUM_RUNNING = Gauge("megastack_textgen_num_requests_running", "Sequences in the running batch.")
QUEUE_CAPACITY = Gauge(
    "megastack_textgen_queue_capacity",
    "Sequences that may wait before new ones are refused (max_queue_size).",
)
BATCH_CAPACITY = Gauge(
    "megastack_textgen_batch_capacity", "KV-cache slots: sequences decoded together (max_batch_size)."
)
KV_CACHE_USAGE = Gauge("megastack_textgen_kv_cache_usage_ratio", "Fraction of KV-cache slots in use (0..1).")
TTFT = Histogram(
    "megastack_textgen_time_to_first_token_seconds",
    "Submit to first generated token.",
    buckets=LATENCY_BUCKETS_S,
)
ITL = Histogram(
    "megastack_textgen_inter_token_latency_seconds",
    "Time between consecutive generated tokens.",
    buckets=ITL_BUCKETS_S,
)
E2E = Histogram(
    "megastack_textgen_e2e_request_latency_seconds", "Submit to finish.", buckets=LATENCY_BUCKETS_S
)
QUEUE_TIME = Histogram(
    "megastack_textgen_request_queue_time_seconds", "Submit to prefill start.", buckets=LATENCY_BUCKETS_S
)
PROMPT_TOKENS = Counter("megastack_textgen_prompt_tokens_total", "Prompt tokens prefilled.")
GENERATION_TOKENS = Counter("megastack_textgen_generation_tokens_total", "Tokens generated.")
REQUEST_PROMPT_TOKENS = Histogram(
    "megastack_textgen_request_prompt_tokens", "Prompt length per sequence.", buckets=TOKEN_BUCKETS
)
REQUEST_GENERATION_TOKENS = Histogram(
    "megastack_textgen_request_generation_tokens", "Generated length per sequence.", buckets=TOKEN_BUCKETS
)
SUCCESS = Counter(
    "megastack_textgen_request_success_total", "Sequences finished, by reason.", ["finished_reason"]
)
FAILURE = Counter(
    "megastack_textgen_request_failure_total", "Sequences that failed or were refused, by cause.", ["err"]
)
FORWARD_TIME = Histogram(
    "megastack_textgen_batch_forward_duration_seconds",
    "Model forward time per engine step.",
    ["method"],
    buckets=LATENCY_BUCKETS_S,
)
BATCH_SIZE = Histogram(
    "megastack_textgen_batch_size", "Sequences per decode step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)

for reason in ("length", "eos", "stop_sequence", "eol"):
    SUCCESS.labels(reason)
for err in ("cancelled", "overloaded", "validation", "generation"):
    FAILURE.labels(err)
for method in ("prefill", "decode"):
    FORWARD_TIME.labels(method)
