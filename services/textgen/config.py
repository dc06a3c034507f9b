"""textgen settings (environment variables MEGASTACK_TEXTGEN_*)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import ServiceConfig, setting
from shared.paths import DEFAULT_MODEL_DIR


@dataclass(frozen=True, kw_only=True)
class TextgenConfig(ServiceConfig):
    port: int = setting(50051, help="gRPC port; 0 picks a free port.")
    metrics_port: int = setting(9401, help="Prometheus /metrics port; 0 picks a free port.")
    model_dir: Path = setting(
        DEFAULT_MODEL_DIR, help="Checkpoint to serve: an HF folder or a Megatron (mcore/legacy) checkpoint."
    )
    model_name: str = setting(
        "", help="Name clients use for the model (OpenAI `model`); empty = the folder name."
    )
    dtype: str = setting(
        "float32", help="Weights and activations dtype.", choices=("float32", "bfloat16", "float16")
    )
    device: str = setting("auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
    max_batch_size: int = setting(
        256, help="Sequences running (decoded together) at most; the KV cache's blocks bound it too."
    )
    kv_cache_mb: int = setting(
        0,
        help="Memory for the paged KV cache, MiB. 0 = automatic: on CUDA 80% of the device memory free once "
        "the weights are loaded, on CPU 2048 MiB (at most half the available memory). Never more than "
        "max_batch_size sequences of the full context need.",
    )
    kv_cache_blocks: int = setting(
        0,
        help="Number of KV-cache blocks, overriding kv_cache_mb when > 0 (vLLM's num_gpu_blocks_override; "
        "tests use it to run out of blocks on purpose). The pool must hold one sequence of the full context.",
    )
    block_size: int = setting(
        16, help="Tokens per KV-cache block (the unit of allocation and prefix caching)."
    )
    prefix_caching: bool = setting(
        True,
        help="Automatic prefix caching: full blocks of a prompt that an earlier request already computed "
        "(same tokens from the start) are reused instead of prefilled again.",
    )
    max_queue_size: int = setting(
        256, help="Sequences waiting for a slot before new ones get RESOURCE_EXHAUSTED (HTTP 429)."
    )
    max_context_tokens: int = setting(
        2048, help="Prompt + generation limit per sequence (capped by the model's max_position_embeddings)."
    )
    max_prefill_tokens: int = setting(
        4096, help="Padded prompt tokens prefilled together in one engine step."
    )
    prefill_chunk_tokens: int = setting(
        16,
        help="Chunked prefill: while sequences are decoding, a prompt's tokens prefilled per engine step, "
        "riding on the decode step's forward pass (a long prompt is split over steps so running streams keep "
        "producing tokens); an idle engine prefills a prompt whole. Scoring and batch-invariant sequences "
        "are never split. Smaller: steadier streams, a slower long prompt (SmolLM2, float32, 2 AVX-512 "
        "cores: 8 streams' step 16 ms alone; with a 16-token chunk of a 1,500-token prompt 37 ms at its "
        "start, 61 ms at its end; with 32 tokens 49 and 83 ms).",
    )
    prefill_step_tokens: int = setting(
        512,
        help="Chunked prefill: all prompts' tokens prefilled per engine step while sequences decode (each "
        "prompt at most `prefill_chunk_tokens` of them, oldest first), so a burst of short prompts starts "
        "in a step or two instead of one prompt per step. Smaller: steadier streams while a burst arrives, "
        "a slower start for the burst.",
    )
    max_prompts_per_request: int = setting(128, help="Prompts accepted in one Generate call (Megatron: 128).")
    batch_invariant: str = setting(
        "scoring",
        help="Which sequences get tokens and log-probs that do not depend on what else is batched: `scoring` "
        "(the default: scoring-only sequences, as lm-eval sends, and sampled ones with a seed), `all`, or "
        "`off`. Prompts to score go through packed passes (no padding) in every mode, whose every row is "
        "the same whatever it is packed with; invariant ones reuse only cached prefixes written by such "
        "passes. Invariant sequences that generate run in forward passes of their own, at the cost of "
        "batching them.",
        choices=("off", "scoring", "all"),
    )
    num_threads: int = setting(0, help="torch intra-op threads; 0 = all cores.")
    watchdog_s: float = setting(
        60.0,
        help="Health turns NOT_SERVING (gateway /ready 503, routed around) when a busy engine accepts no "
        "token and finishes no sequence for this long.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "max_batch_size",
            "max_queue_size",
            "max_context_tokens",
            "max_prefill_tokens",
            "max_prompts_per_request",
            "block_size",
            "prefill_chunk_tokens",
            "prefill_step_tokens",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_queue_size < self.max_prompts_per_request:
            raise ValueError(
                f"max_queue_size ({self.max_queue_size}) must be >= max_prompts_per_request "
                f"({self.max_prompts_per_request}), or a full request could never be queued"
            )
        if not self.watchdog_s > 0:
            raise ValueError(f"watchdog_s must be > 0, got {self.watchdog_s}")
        for name in ("kv_cache_mb", "kv_cache_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = automatic), got {getattr(self, name)}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
