"""Prometheus metrics of the text-generation engine (names mirror vLLM/TGI, prefix megastack_textgen_).

One "request" here is one sequence: a Generate call with N prompts counts N. Each metric that vLLM also
exports is updated together with its vLLM twin (``vllm:*``, labelled ``model_name`` as vLLM labels it), so
dashboards and alerts made for vLLM work unchanged: see :data:`VLLM_TWINS`. The engine calls one object per
metric; :func:`bind_model` sets the ``model_name`` label value once the served model is known.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS_S

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ITL_BUCKETS_S = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)

_NUM_WAITING = Gauge("megastack_textgen_num_requests_waiting", "Sequences queued, not yet prefilled.")
_NUM_RUNNING = Gauge("megastack_textgen_num_requests_running", "Sequences in the running batch.")
QUEUE_CAPACITY = Gauge(
    "megastack_textgen_queue_capacity",
    "Sequences that may wait before new ones are refused (max_queue_size).",
)
BATCH_CAPACITY = Gauge(
    "megastack_textgen_batch_capacity", "Sequences that may run (be decoded) together (max_batch_size)."
)
_KV_CACHE_USAGE = Gauge(
    "megastack_textgen_kv_cache_usage_ratio",
    "Fraction of the KV cache's blocks referenced by a sequence (0..1; unused cached prefixes count free).",
)
KV_CACHE_BLOCKS = Gauge("megastack_textgen_kv_cache_blocks", "Blocks in the KV-cache pool (usable ones).")
KV_CACHE_BLOCK_SIZE = Gauge("megastack_textgen_kv_cache_block_size", "Tokens per KV-cache block.")
_PREFIX_CACHE_QUERIES = Counter(
    "megastack_textgen_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."
)
_PREFIX_CACHE_HITS = Counter(
    "megastack_textgen_prefix_cache_hits_total", "Prompt tokens found in the prefix cache (not computed)."
)
_PREEMPTIONS = Counter(
    "megastack_textgen_num_preemptions_total",
    "Running sequences preempted when the KV cache ran out (their cache is recomputed later).",
)
PREFILL_COMPUTED_TOKENS = Counter(
    "megastack_textgen_prefill_computed_tokens_total",
    "Context tokens run through a prefill forward pass (prompt tokens minus prefix-cache hits, plus "
    "recomputation after preemption).",
)
_TTFT = Histogram(
    "megastack_textgen_time_to_first_token_seconds",
    "Submit to first generated token.",
    buckets=LATENCY_BUCKETS_S,
)
_ITL = Histogram(
    "megastack_textgen_inter_token_latency_seconds",
    "Time between consecutive generated tokens.",
    buckets=ITL_BUCKETS_S,
)
_E2E = Histogram(
    "megastack_textgen_e2e_request_latency_seconds", "Submit to finish.", buckets=LATENCY_BUCKETS_S
)
_QUEUE_TIME = Histogram(
    "megastack_textgen_request_queue_time_seconds", "Submit to prefill start.", buckets=LATENCY_BUCKETS_S
)
_PROMPT_TOKENS = Counter("megastack_textgen_prompt_tokens_total", "Prompt tokens prefilled.")
_GENERATION_TOKENS = Counter("megastack_textgen_generation_tokens_total", "Tokens generated.")
_REQUEST_PROMPT_TOKENS = Histogram(
    "megastack_textgen_request_prompt_tokens", "Prompt length per sequence.", buckets=TOKEN_BUCKETS
)
_REQUEST_GENERATION_TOKENS = Histogram(
    "megastack_textgen_request_generation_tokens", "Generated length per sequence.", buckets=TOKEN_BUCKETS
)
_SUCCESS = Counter(
    "megastack_textgen_request_success_total", "Sequences finished, by reason.", ["finished_reason"]
)
_FAILURE = Counter(
    "megastack_textgen_request_failure_total", "Sequences that failed or were refused, by cause.", ["err"]
)
FORWARD_TIME = Histogram(
    "megastack_textgen_batch_forward_duration_seconds",
    "Model forward time per engine step (mixed: a prefill with the decode step riding on it).",
    ["method"],
    buckets=LATENCY_BUCKETS_S,
)
BATCH_SIZE = Histogram(
    "megastack_textgen_batch_size", "Sequences per decode step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128)
)

MODEL = ["megastack"]  # the model_name label value; bind_model() sets the served model's name
# our finish reasons -> vLLM's finished_reason values (stop / length / abort)
VLLM_REASON = {
    "length": "length",
    "eos": "stop",
    "stop_sequence": "stop",
    "eol": "stop",
    "cancelled": "abort",
}


def _vllm(kind: type, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any) -> Any:
    return kind(name, doc, ["model_name", *labels], **kw)


class _Twin:
    """Our metric and its vLLM twin, updated by one call. A labelled metric's ``label_map`` turns our label
    values into vLLM's (None: that value has no vLLM twin)."""

    def __init__(self, ours: Any, theirs: Any, label_map: Any = None, bound: tuple[str, ...] = ()) -> None:
        self.ours, self.theirs, self.label_map, self.bound = ours, theirs, label_map, bound

    def labels(self, *values: str) -> _Twin:
        mapped = self.label_map(*values) if self.label_map is not None else None
        return _Twin(self.ours.labels(*values), self.theirs if mapped is not None else None, None, (mapped,))

    def _both(self) -> list[Any]:
        if self.theirs is None:
            return [self.ours]
        return [self.ours, self.theirs.labels(MODEL[0], *(b for b in self.bound if b is not None))]

    def set(self, value: float) -> None:
        for m in self._both():
            m.set(value)

    def inc(self, amount: float = 1) -> None:
        for m in self._both():
            m.inc(amount)

    def observe(self, value: float) -> None:
        for m in self._both():
            m.observe(value)


NUM_WAITING = _Twin(
    _NUM_WAITING, _vllm(Gauge, "vllm:num_requests_waiting", "Requests waiting to be processed.")
)
NUM_RUNNING = _Twin(_NUM_RUNNING, _vllm(Gauge, "vllm:num_requests_running", "Requests in the running batch."))
KV_CACHE_USAGE = _Twin(_KV_CACHE_USAGE, _vllm(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage, 0..1."))
PREFIX_CACHE_QUERIES = _Twin(
    _PREFIX_CACHE_QUERIES, _vllm(Counter, "vllm:prefix_cache_queries", "Prefix cache queries, in tokens.")
)
PREFIX_CACHE_HITS = _Twin(
    _PREFIX_CACHE_HITS, _vllm(Counter, "vllm:prefix_cache_hits", "Prefix cache hits, in tokens.")
)
PREEMPTIONS = _Twin(_PREEMPTIONS, _vllm(Counter, "vllm:num_preemptions", "Cumulative preemptions."))
TTFT = _Twin(
    _TTFT,
    _vllm(Histogram, "vllm:time_to_first_token_seconds", "Time to first token.", buckets=LATENCY_BUCKETS_S),
)
ITL = _Twin(
    _ITL, _vllm(Histogram, "vllm:inter_token_latency_seconds", "Inter-token latency.", buckets=ITL_BUCKETS_S)
)
E2E = _Twin(
    _E2E,
    _vllm(Histogram, "vllm:e2e_request_latency_seconds", "Request latency.", buckets=LATENCY_BUCKETS_S),
)
QUEUE_TIME = _Twin(
    _QUEUE_TIME,
    _vllm(
        Histogram, "vllm:request_queue_time_seconds", "Time in the waiting queue.", buckets=LATENCY_BUCKETS_S
    ),
)
PROMPT_TOKENS = _Twin(_PROMPT_TOKENS, _vllm(Counter, "vllm:prompt_tokens", "Prefill tokens processed."))
GENERATION_TOKENS = _Twin(
    _GENERATION_TOKENS, _vllm(Counter, "vllm:generation_tokens", "Generation tokens processed.")
)
REQUEST_PROMPT_TOKENS = _Twin(
    _REQUEST_PROMPT_TOKENS,
    _vllm(Histogram, "vllm:request_prompt_tokens", "Prompt tokens per request.", buckets=TOKEN_BUCKETS),
)
REQUEST_GENERATION_TOKENS = _Twin(
    _REQUEST_GENERATION_TOKENS,
    _vllm(
        Histogram, "vllm:request_generation_tokens", "Generated tokens per request.", buckets=TOKEN_BUCKETS
    ),
)
_VLLM_SUCCESS = _vllm(Counter, "vllm:request_success", "Finished requests.", ("finished_reason",))
SUCCESS = _Twin(_SUCCESS, _VLLM_SUCCESS, lambda reason: VLLM_REASON[reason])
# a cancelled sequence is vLLM's finished_reason="abort"; refusals and engine faults have no vLLM twin
FAILURE = _Twin(_FAILURE, _VLLM_SUCCESS, lambda err: VLLM_REASON.get(err))
VLLM_TWINS = {
    "vllm:num_requests_waiting": "megastack_textgen_num_requests_waiting",
    "vllm:num_requests_running": "megastack_textgen_num_requests_running",
    "vllm:kv_cache_usage_perc": "megastack_textgen_kv_cache_usage_ratio",
    "vllm:prefix_cache_queries_total": "megastack_textgen_prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total": "megastack_textgen_prefix_cache_hits_total",
    "vllm:num_preemptions_total": "megastack_textgen_num_preemptions_total",
    "vllm:time_to_first_token_seconds": "megastack_textgen_time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds": "megastack_textgen_inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds": "megastack_textgen_e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds": "megastack_textgen_request_queue_time_seconds",
    "vllm:prompt_tokens_total": "megastack_textgen_prompt_tokens_total",
    "vllm:generation_tokens_total": "megastack_textgen_generation_tokens_total",
    "vllm:request_prompt_tokens": "megastack_textgen_request_prompt_tokens",
    "vllm:request_generation_tokens": "megastack_textgen_request_generation_tokens",
    "vllm:request_success_total": "megastack_textgen_request_success_total (+ cancelled failures as abort)",
}


def bind_model(name: str) -> None:
    """The ``model_name`` label of every vLLM twin: the served model's name (what /v1/models lists)."""
    MODEL[0] = name
    for counter in (PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, PREEMPTIONS):
        counter.theirs.labels(name)
    for reason in ("stop", "length", "abort"):
        _VLLM_SUCCESS.labels(name, reason)


for reason in ("length", "eos", "stop_sequence", "eol"):
    _SUCCESS.labels(reason)
for err in ("cancelled", "overloaded", "validation", "generation"):
    _FAILURE.labels(err)
for method in ("prefill", "decode", "mixed"):
    FORWARD_TIME.labels(method)


def report_engine(
    waiting: int, running: int, kv_usage: float, counts: tuple[int, int, int], before: tuple[int, int, int]
) -> None:
    """After an engine step: the queue and batch gauges, KV usage, and the growth of the prefix-cache
    queries / hits and preemption counts since ``before``."""
    NUM_WAITING.set(waiting)
    NUM_RUNNING.set(running)
    KV_CACHE_USAGE.set(kv_usage)
    for counter, now, then in zip((PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS, PREEMPTIONS), counts, before):
        if now > then:
            counter.inc(now - then)
