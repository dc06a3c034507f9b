"""Training checkpoints (torch_dist): model, optimizer, LR scheduler, data position and RNG, atomically.

Every rank writes its shards into ``<save_dir>/.tmp-iter_XXXXXXX``; rank 0 then renames it to
``iter_XXXXXXX`` and updates ``latest_checkpointed_iteration.txt`` (atomically), so a job killed while
saving resumes from the previous complete checkpoint. The layout is Megatron-LM's: the model under
``model`` (``model0``, ``model1``, ... for a virtual pipeline), so Megatron tools read it too.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shared.atomic import mark_output, write_text_atomic
from shared.checkpoints.megatron import TRACKER

logger = logging.getLogger(__name__)
SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_iteration(save_dir: Path) -> int | None:
    tracker = Path(save_dir) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit() or not (Path(save_dir) / iter_name(int(text))).is_dir():
        return None
    return int(text)


def model_sharded_state(models: list) -> dict[str, Any]:
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}


def _rng_object(is_loading: bool = False):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = None if is_loading else {
        "random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state(),
    }
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def describe(save_dir: Path, spec, arch, tok_dir: Path | None, padded_vocab: int) -> None:
    """Write megastack.json and tokenizer/ into the save folder, so `megastack convert` turns any of its
    iterations back into HF on its own (rank 0, before the first save)."""
    import json

    from shared.checkpoints import open_checkpoint
    from shared.checkpoints.megatron import write_description

    if spec.init_from:
        hf_config = open_checkpoint(Path(spec.init_from)).hf_config
    else:
        cfg = Path(spec.architecture)
        hf_config = json.loads((cfg / "config.json" if cfg.is_dir() else cfg).read_text())
    meta = {
        "format": "mcore", "created_by": "megastack trainer", "created_unix_s": time.time(), "job": spec.name, "kind": spec.kind,
        "init_from": spec.init_from or None, "arch": arch.to_dict(), "hf_config": {**hf_config, "vocab_size": arch.vocab_size},
        "padded_vocab_size": padded_vocab, "make_vocab_size_divisible_by": 128, "tensor_parallel": spec.tp,
        "pipeline_parallel": spec.pp, "params_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[spec.precision],
    }
    files = sorted(p for p in Path(tok_dir).iterdir() if p.is_file()) if tok_dir and Path(tok_dir).is_dir() else []
    write_description(Path(save_dir), meta, files)
    mark_output(Path(save_dir))  # megastack's folder: resumes and cleanups of old iterations may touch it


def save(save_dir: Path, iteration: int, *, models: list, optimizer, scheduler, consumed_samples: int, keep_last: int) -> float:
    from megatron.core import dist_checkpointing

    t0 = time.perf_counter()
    save_dir = Path(save_dir)
    final = save_dir / iter_name(iteration)
    tmp = save_dir / f".tmp-{iter_name(iteration)}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = model_sharded_state(models)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=SHARDING)
    state.update(iteration=iteration, consumed_samples=consumed_samples, opt_param_scheduler=scheduler.state_dict(),
                 checkpoint_version=3.0, rng_state=_rng_object())
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_text_atomic(save_dir / TRACKER, str(iteration))
        done = sorted(int(p.name[5:]) for p in save_dir.glob("iter_*") if p.name[5:].isdigit())
        for old in done[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(save_dir / iter_name(old), ignore_errors=True)
    dist.barrier()
    return time.perf_counter() - t0


def init_optimizer_state(optimizer) -> None:
    """Give torch Adam its state before loading one: a zero-gradient step at lr=0 (changes nothing)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    with torch.no_grad():
        for o in subs:
            groups = o.optimizer.param_groups
            saved = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] = 0.0
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            o.optimizer.step()
            o.optimizer.zero_grad()
            for g, lr in zip(groups, saved):
                g["lr"] = lr


def load(save_dir: Path, iteration: int, *, models: list, optimizer, scheduler) -> tuple[int, int]:
    """Restore everything saved by :func:`save`; returns (iteration, consumed_samples)."""
    from shared.mcore.model import load_distributed, load_module_state

    init_optimizer_state(optimizer)
    state = model_sharded_state(models)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=SHARDING)
    state["rng_state"] = _rng_object(is_loading=True)
    loaded = load_distributed(state, Path(save_dir) / iter_name(iteration))
    keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    for m, k in zip(models, keys):
        load_module_state(m, loaded[k])
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    rng = loaded["rng_state"]
    random.setstate(rng["random"])
    np.random.set_state(rng["np"])
    torch.set_rng_state(rng["torch"])
    return int(loaded["iteration"]), int(loaded["consumed_samples"])


def load_weights(init_from: Path, models: list) -> None:
    """Initialise from a converter checkpoint (model only, any TP/PP)."""
    from shared.checkpoints.megatron import iteration_dir
    from shared.mcore.model import load_distributed, load_module_state

    loaded = load_distributed(model_sharded_state(models), iteration_dir(Path(init_from)))
    keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    for m, k in zip(models, keys):
        load_module_state(m, loaded[k])
