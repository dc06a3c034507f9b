"""Load a checkpoint (any format, through the shared readers) into the engine's model and tokenizer."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.checkpoints import open_checkpoint
from llm.checkpoints.fingerprint import checkpoint_id, tokenizer_id
from llm.devices import dtype_name, resolve_device, resolve_dtype
from llm.models.base import ArchConfig
from llm.tokenizers import Tokenizer
from services.textgen.config import TextgenConfig
from services.textgen.engine import Engine
from services.textgen.modeling import DecoderLM, PagedKVCache, UnsupportedModel
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
    checkpoint_id: str = ""  # llm.checkpoints.fingerprint: what caches of this model's outputs are keyed by
    tokenizer_id: str = ""


def tokenizer_info(tok: Tokenizer, eos_ids: tuple[int, ...] = ()) -> TokenizerInfo:
    return TokenizerInfo(
        eos_id=tok.eos_id,
        newline_id=tok.single_token_id("\n"),
        double_newline_id=tok.single_token_id("\n\n"),
        colon_id=tok.single_token_id(":"),
        vocab_size=tok.vocab_size,
        decode=tok.decode,
        eos_ids=eos_ids,
    )


def model_eos_ids(path: Path, hf_config: dict) -> tuple[int, ...]:
    """The ids the model's own files say end a sequence: ``eos_token_id`` of ``generation_config.json``
    (what HF ``generate()`` stops on; Llama 3 Instruct lists three) and of its config, ids or lists."""
    found: list[int] = []
    gen = Path(path) / "generation_config.json"
    docs = [hf_config]
    if gen.is_file():
        try:
            docs.insert(0, json.loads(gen.read_text()))
        except ValueError:
            raise StartupError(f"{gen} is not valid JSON") from None
    for doc in docs:
        value = doc.get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                found.append(v)
    return tuple(dict.fromkeys(found))


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


CPU_DEFAULT_KV_MB = 2048
GPU_KV_FRACTION = 0.8


def kv_cache_blocks(
    cfg: TextgenConfig, arch: ArchConfig, max_len: int, dtype: torch.dtype, device: torch.device
) -> tuple[int, str]:
    """How many blocks the pool gets (the null block included): the override, or the memory budget, capped
    at what ``max_batch_size`` sequences of the full context could ever use; and the settings that said so."""
    per_block = PagedKVCache.bytes_per_block(arch, block_size=cfg.block_size, dtype=dtype)
    per_seq = -(-max_len // cfg.block_size)
    useful = cfg.max_batch_size * per_seq + 1
    if cfg.kv_cache_blocks:
        n = cfg.kv_cache_blocks
        why = f"MEGASTACK_TEXTGEN_KV_CACHE_BLOCKS={n}"
    else:
        if cfg.kv_cache_mb:
            budget = cfg.kv_cache_mb * 2**20
        elif device.type == "cuda":
            budget = int(GPU_KV_FRACTION * _free_bytes(device))
        else:
            budget = min(CPU_DEFAULT_KV_MB * 2**20, _free_bytes(device) // 2)
        n = min(budget // per_block, useful)
        why = (
            f"MEGASTACK_TEXTGEN_KV_CACHE_MB={cfg.kv_cache_mb or 'auto'} ({budget / 2**20:.0f} MiB; at most "
            f"MEGASTACK_TEXTGEN_MAX_BATCH_SIZE={cfg.max_batch_size} x MEGASTACK_TEXTGEN_MAX_CONTEXT_TOKENS="
            f"{max_len} tokens)"
        )
    if n - 1 < per_seq:
        raise StartupError(
            f"{why} gives {max(n - 1, 0)} KV-cache blocks of {cfg.block_size} tokens "
            f"({per_block / 2**20:.2f} MiB each), fewer than one sequence of "
            f"MEGASTACK_TEXTGEN_MAX_CONTEXT_TOKENS={max_len} needs ({per_seq}); raise the budget or lower "
            "the context"
        )
    return n, why


def _allocate_cache(
    cfg: TextgenConfig, arch: ArchConfig, max_len: int, dtype: torch.dtype, device: torch.device
) -> PagedKVCache:
    """The paged KV cache, or a StartupError naming the settings that size it when it cannot fit."""
    n, why = kv_cache_blocks(cfg, arch, max_len, dtype, device)
    need = n * PagedKVCache.bytes_per_block(arch, block_size=cfg.block_size, dtype=dtype)
    free = _free_bytes(device)
    hint = f"the KV cache ({n} blocks of {cfg.block_size} tokens, from {why}) needs {need / 2**30:.2f} GiB"
    if need > 0.9 * free:
        raise StartupError(f"{hint} but {free / 2**30:.2f} GiB are free on {device}; lower the setting")
    try:
        return PagedKVCache(arch, num_blocks=n, block_size=cfg.block_size, dtype=dtype, device=device)
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as e:
        raise StartupError(
            f"{hint} and could not be allocated on {device} ({type(e).__name__}); lower the setting"
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
        eos_ids = model_eos_ids(path, reader.hf_config)
        ids = (checkpoint_id(path), tokenizer_id(tok_dir))
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
        tokenizer_info(tokenizer, eos_ids),
        EngineConfig(
            cfg.max_batch_size,
            cfg.max_queue_size,
            cfg.max_prefill_tokens,
            cfg.batch_invariant,
            prefix_caching=cfg.prefix_caching,
            prefill_chunk_tokens=cfg.prefill_chunk_tokens,
            prefill_step_tokens=cfg.prefill_step_tokens,
        ),
    )
    logger.info(
        "loaded %s (%s, %s, %.1fM params) on %s/%s in %.1fs; KV cache %.0f MiB: %d blocks of %d tokens "
        "(%d tokens), context %d",
        path,
        reader.format,
        reader.arch.architecture,
        model.num_parameters() / 1e6,
        device,
        dtype_name(dtype),
        time.perf_counter() - t0,
        cache.nbytes() / 2**20,
        cache.num_blocks - 1,
        cfg.block_size,
        (cache.num_blocks - 1) * cfg.block_size,
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
        checkpoint_id=ids[0],
        tokenizer_id=ids[1],
    )
