"""Training checkpoints (torch_dist): model, optimizer, LR scheduler, data position and RNG, atomically.

Every rank writes its shards into ``<save_dir>/.tmp-iter_XXXXXXX``; rank 0 then renames it to
``iter_XXXXXXX`` and updates ``latest_checkpointed_iteration.txt`` (atomically), so a job killed while
saving resumes from the previous complete checkpoint. With ``checkpoint.async_save`` the shards are written
in the background (:class:`Saver`) and published the same way once all ranks are done. The layout is
Megatron-LM's: the model under ``model`` (``model0``, ``model1``, ... for a virtual pipeline), so Megatron
tools read it too.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from llm.checkpoints.megatron import TRACKER
from services.trainer.jobfiles import SAVES_FILE, hold_file, iter_name
from shared.atomic import mark_output, write_text_atomic
from shared.proc import die_with_parent

logger = logging.getLogger(__name__)
SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


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

    state = (
        None
        if is_loading
        else {
            "random": random.getstate(),
            "np": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
    )
    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def describe(save_dir: Path, spec, arch, tok_dir: Path | None, padded_vocab: int) -> None:
    """Write megastack.json and tokenizer/ into the save folder, so `megastack convert` turns any of its
    iterations back into HF on its own (rank 0, before the first save)."""
    import json

    from llm.checkpoints import open_checkpoint
    from llm.checkpoints.megatron import write_description

    if spec.init_from:
        hf_config = open_checkpoint(Path(spec.init_from)).hf_config
    else:
        cfg = Path(spec.architecture)
        hf_config = json.loads((cfg / "config.json" if cfg.is_dir() else cfg).read_text())
    meta = {
        "format": "mcore",
        "created_by": "megastack trainer",
        "created_unix_s": time.time(),
        "job": spec.name,
        "kind": spec.kind,
        "init_from": spec.init_from or None,
        "arch": arch.to_dict(),
        "hf_config": {**hf_config, "vocab_size": arch.vocab_size},
        "padded_vocab_size": padded_vocab,
        "make_vocab_size_divisible_by": 128,
        "tensor_parallel": spec.tp,
        "pipeline_parallel": spec.pp,
        "params_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[spec.precision],
    }
    files = (
        sorted(p for p in Path(tok_dir).iterdir() if p.is_file())
        if tok_dir and Path(tok_dir).is_dir()
        else []
    )
    write_description(Path(save_dir), meta, files)
    mark_output(Path(save_dir))  # megastack's folder: resumes and cleanups of old iterations may touch it


def _publish(save_dir: Path, iteration: int, keep_last: int) -> None:
    """Rank 0, once every rank's shards are written: the temporary folder becomes ``iter_XXXXXXX``, the
    tracker names it (atomically), old iterations beyond ``keep_last`` go, except one the trainer service
    holds while it exports it for evaluation (``jobfiles.hold_file``). Until then the previous one is the
    latest."""
    final, tmp = save_dir / iter_name(iteration), save_dir / f".tmp-{iter_name(iteration)}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    write_text_atomic(save_dir / TRACKER, str(iteration))
    done = sorted(int(p.name[5:]) for p in save_dir.glob("iter_*") if p.name[5:].isdigit())
    for old in done[:-keep_last] if keep_last > 0 else []:
        if not hold_file(save_dir, old).exists():
            shutil.rmtree(save_dir / iter_name(old), ignore_errors=True)


def discard_partial(save_dir: Path) -> list[str]:
    """Remove the ``.tmp-iter_*`` folders of saves that never completed (rank 0, before training starts: their
    writers died with the attempt that started them). Only megastack's own temporary names are touched."""
    gone = []
    for p in sorted(Path(save_dir).glob(".tmp-iter_*")):
        if p.is_dir() and p.name[len(".tmp-iter_") :].isdigit():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


_FORK_HOOK = []


def _writer_results_queue_dies_with_rank() -> None:
    """megatron-core's checkpoint writer reports through a queue served by a ``multiprocessing`` Manager, a
    spawned process made on the first save that outlives a rank killed by SIGKILL (an orphan per killed rank,
    holding the rank's stdout). Made here first, with the same spawn context, its server process is SIGKILLed
    with the rank instead (megatron-core then finds the queue in place and uses it)."""
    import multiprocessing as mp

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return
    if getattr(fa, "_results_queue", "absent") is not None:  # made already, or a megatron-core without it
        return
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent)
    fa._results_queue = manager.Queue()
    _MANAGERS.append(manager)  # alive as long as the rank


_MANAGERS: list = []


class Saver:
    """Writes torch_dist checkpoints, in the step loop (sync) or in the background
    (``checkpoint.async_save``).

    Async: megatron-core's async save; the step loop blocks while the state dict is built and a writer process
    is forked with the tensors (a copy from the GPU first, on a GPU), then goes on; every step asks (one small
    all-reduce) whether all ranks' writers are done, and the checkpoint is published (renamed, tracker
    updated) only then. One save is in flight at a time: the next save, and the end of training, wait for it.
    A job killed meanwhile leaves ``.tmp-iter_*`` behind and resumes from the previous checkpoint.
    """

    def __init__(self, save_dir: Path, *, keep_last: int, async_save: bool) -> None:
        self.save_dir, self.keep_last, self.async_save = Path(save_dir), keep_last, async_save
        self._queue = None
        _writer_results_queue_dies_with_rank()
        self._started: dict[int, float] = {}  # iteration -> perf_counter when its save started
        self.completed: list[tuple[int, float]] = []  # (iteration, seconds from start to published)
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)
            if not _FORK_HOOK:
                os.register_at_fork(
                    after_in_child=die_with_parent
                )  # the background writers die with the rank
                _FORK_HOOK.append(True)

    def save(self, iteration: int, *, models: list, optimizer, scheduler, consumed_samples: int) -> float:
        """Save ``iteration``; returns the seconds the caller was blocked."""
        from megatron.core import dist_checkpointing

        self.wait()  # one in flight at a time
        t0 = time.perf_counter()
        tmp = self.save_dir / f".tmp-{iter_name(iteration)}"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = model_sharded_state(models)
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=SHARDING)
        state.update(
            iteration=iteration,
            consumed_samples=consumed_samples,
            opt_param_scheduler=scheduler.state_dict(),
            checkpoint_version=3.0,
            rng_state=_rng_object(),
        )
        self._started[iteration] = t0
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=self.async_save)
        if request is None:
            blocked = time.perf_counter() - t0
            self._finish(iteration, blocked)
            return blocked
        cost: dict[str, float] = {}
        request.add_finalize_fn(
            lambda: self._finish(iteration, cost["blocked"])
        )  # run once every rank's writer is done
        self._queue.schedule_async_request(request)
        cost["blocked"] = time.perf_counter() - t0
        return cost["blocked"]

    def _finish(self, iteration: int, blocked_s: float) -> None:  # every rank
        dist.barrier()
        took = time.perf_counter() - self._started.pop(iteration)
        if dist.get_rank() == 0:
            _publish(self.save_dir, iteration, self.keep_last)
            with open(self.save_dir / SAVES_FILE, "a") as f:  # what each save cost the step loop, and in all
                f.write(
                    json.dumps(
                        {
                            "iteration": iteration,
                            "async": self.async_save,
                            "blocked_s": blocked_s,
                            "written_s": took,
                            "unix_s": time.time(),
                        }
                    )
                    + "\n"
                )
        dist.barrier()
        self.completed.append((iteration, took))
        if self.async_save:
            logger.info("checkpoint %s written in the background in %.1fs", iter_name(iteration), took)

    def poll(self) -> None:
        """Publish the background saves that are done (every rank, at the same steps: a collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until every background save is written and published (every rank)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)

    @property
    def last_published(self) -> int | None:
        """The iteration of the newest checkpoint published by this saver, or None."""
        return self.completed[-1][0] if self.completed else None

    @property
    def in_flight(self) -> int:
        return self._queue.get_num_unfinalized_calls() if self._queue is not None else 0


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
    from llm.mcore.model import load_distributed, load_module_state

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
    from llm.checkpoints.megatron import iteration_dir
    from llm.mcore.model import load_distributed, load_module_state

    loaded = load_distributed(model_sharded_state(models), iteration_dir(Path(init_from)))
    keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    for m, k in zip(models, keys):
        load_module_state(m, loaded[k])
