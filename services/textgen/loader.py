"""Load a checkpoint (any format, through the shared readers) into the engine's model and tokenizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.checkpoints import open_checkpoint
from llm.devices import dtype_name, resolve_device, resolve_dtype
from llm.models.base import ArchConfig
from llm.tokenizers import Tokenizer
from services.textgen.config import TextgenConfig
from services.textgen.engine import Engine
from services.textgen.modeling import DecoderLM, KVCache, UnsupportedModel
from services.textgen.sequences import EngineConfig, TokenizerInfo
from shared.errors import ServiceError, StartupError

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    name: str
    arch: ArchConfig
    model: DecoderLM
    tokenizer: Tokenizer
    engine: Engine
    source_format: str
    dtype: str
    device: str
    max_context_tokens: int


def tokenizer_info(tok: Tokenizer) -> TokenizerInfo:
    return TokenizerInfo(
        eos_id=tok.eos_id,
        newline_id=tok.single_token_id("\n"),
        double_newline_id=tok.single_token_id("\n\n"),
        colon_id=tok.single_token_id(":"),
        vocab_size=tok.vocab_size,
        decode=tok.decode,
    )


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def _allocate_cache(
    cfg: TextgenConfig, arch: ArchConfig, max_len: int, dtype: torch.dtype, device: torch.device
) -> KVCache:
    """The KV cache, or a StartupError naming the settings that size it when it cannot fit."""
    need = KVCache.bytes_needed(arch, num_slots=cfg.max_batch_size, max_len=max_len, dtype=dtype)
    free = _free_bytes(device)
    hint = (
        f"the KV cache for MEGASTACK_TEXTGEN_MAX_BATCH_SIZE={cfg.max_batch_size} sequences x "
        f"MEGASTACK_TEXTGEN_MAX_CONTEXT_TOKENS={max_len} tokens needs {need / 2**30:.2f} GiB"
    )
    if need > 0.9 * free:
        raise StartupError(f"{hint} but {free / 2**30:.2f} GiB are free on {device}; lower one of them")
    try:
        return KVCache(arch, num_slots=cfg.max_batch_size, max_len=max_len, dtype=dtype, device=device)
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
        raise StartupError(
            f"{hint} and could not be allocated on {device} ({type(e).__name__}); lower one of them"
        ) from None


def load_served_model(cfg: TextgenConfig) -> ServedModel:
    path = Path(cfg.model_dir)
    if not path.exists():
        raise StartupError(
            f"model folder {path} does not exist (run `make setup`, or set MEGASTACK_TEXTGEN_MODEL_DIR)"
        )
    try:
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype)
    except ValueError as e:
        raise StartupError(str(e)) from None
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    t0 = time.perf_counter()
    try:
        reader = open_checkpoint(path)
        tok_dir = reader.tokenizer_dir()
        if tok_dir is None:
            raise StartupError(f"{path}: no tokenizer files found next to the checkpoint")
        tokenizer = Tokenizer.load(tok_dir)
        max_len = min(cfg.max_context_tokens, reader.arch.max_position_embeddings)
        model = DecoderLM(
            reader.arch, reader.canonical_tensors(), dtype=dtype, device=device, max_len=max_len
        )
    except ServiceError as e:
        raise StartupError(f"cannot load {path}: {e.message}") from None
    except UnsupportedModel as e:
        raise StartupError(
            f"cannot serve {path}: {e}; serve another checkpoint (MEGASTACK_TEXTGEN_MODEL_DIR)"
        ) from None
    cache = _allocate_cache(cfg, reader.arch, max_len, dtype, device)
    engine = Engine(
        model,
        cache,
        tokenizer_info(tokenizer),
        EngineConfig(cfg.max_batch_size, cfg.max_queue_size, cfg.max_prefill_tokens, cfg.batch_invariant),
    )
    logger.info(
        "loaded %s (%s, %s, %.1fM params) on %s/%s in %.1fs; KV cache %.0f MiB for %d x %d tokens",
        path,
        reader.format,
        reader.arch.architecture,
        model.num_parameters() / 1e6,
        device,
        dtype_name(dtype),
        time.perf_counter() - t0,
        cache.nbytes() / 2**20,
        cfg.max_batch_size,
        max_len,
    )
    return ServedModel(
        name=cfg.model_name or path.name,
        arch=reader.arch,
        model=model,
        tokenizer=tokenizer,
        engine=engine,
        source_format=reader.format,
        dtype=dtype_name(dtype),
        device=str(device),
        max_context_tokens=max_len,
    )
