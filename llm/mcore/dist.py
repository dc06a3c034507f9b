"""torch.distributed + megatron-core parallel state, the same on CPU (gloo) and GPU (nccl)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llm.mcore import cpu_compat
from shared.net import free_port  # noqa: F401 - re-exported


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None  # model chunks per pipeline rank; None = no virtual pipeline
    ep: int = 1  # expert parallel: MoE experts split over this many data-parallel ranks


def default_backend() -> str:
    """``nccl`` with CUDA, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(par: Parallelism = Parallelism(), *, backend: str | None = None, seed: int = 1234) -> None:
    """Join (or start, for a single process) the process group and set up megatron's parallel state.

    Rank and world come from the usual env (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT); without them this
    is a world of one on a free local port.
    """
    cpu_compat.apply()
    if not dist.is_initialized():
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # launched by torchrun / Ray with the usual variables
            dist.init_process_group(
                backend=backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
            )
        else:  # a world of one; leave the environment alone so child processes do not inherit it
            dist.init_process_group(
                backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
            )
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tp,
            pipeline_model_parallel_size=par.pp,
            virtual_pipeline_model_parallel_size=par.vpp,
            expert_model_parallel_size=par.ep,
        )
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down megatron-core's parallel state and the process group (when they exist)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
