# mypy: disable-error-code="assignment, misc, return-value, method-assign"
# (this module replaces CUDA entry points with CPU stand-ins: the assignments are the point)
"""megatron-core on a CPU-only PyTorch build (gloo): the minimal CUDA -> CPU patches.

megatron-core hard-codes CUDA on its dense-model path (RNG trackers, buffer allocation, the causal mask,
pipeline schedules, optimizers, inference). :func:`apply` installs the patches below once per process,
and only when CUDA is not available: on GPU nodes nothing is touched. Each patch names the
megatron-core 0.16.1 call site that needs it. Also needed on CPU: ``psutil`` (without it
``dist_checkpointing.save`` hangs) and ``batch_p2p_comm=False`` for interleaved PP=2 on gloo.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings

import torch

logger = logging.getLogger(__name__)
_APPLIED = False


def import_megatron_without_compiled_fusions() -> bool:
    """Import megatron-core with its ``@jit_fuser`` functions left eager, on a machine without CUDA.

    ``megatron.core.jit`` binds ``jit_fuser = torch.compile`` when it is imported, and the fused bias /
    activation / router helpers are wrapped with it at import: that import alone pulls in TorchDynamo and
    Inductor (about 2 of a rank's ~4 s of megatron-core import on a 2-core host), and a helper that runs
    would be compiled by Inductor on first use. On CPU ranks neither pays (no fused kernels to gain), so
    ``torch.compile`` is an identity while megatron-core is imported, which fixes ``jit_fuser`` as one (it
    is not looked up again). Returns whether it applied: not with CUDA, nor once megatron-core is loaded.
    """
    import sys

    if torch.cuda.is_available() or "megatron.core" in sys.modules:
        return False
    real = torch.compile

    def identity(model=None, **_kwargs):
        return model if model is not None else (lambda fn: fn)

    torch.compile = identity
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = real
    return True


def _is_cuda_device(d: object) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)


class _CudaToCpu(torch.overrides.TorchFunctionMode):
    """Rewrite device='cuda' / 'cuda:N' / int in factory calls and Tensor.to()/.cuda() to CPU, drop
    pin_memory (schedules.py total_num_tokens, clip_grads, param_and_grad_buffer, inference buffers)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if (
            func is torch.Tensor.to
            and len(args) > 1
            and not isinstance(args[1], int)
            and _is_cuda_device(args[1])
        ):
            args = (args[0], "cpu", *args[2:])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _CpuEvent:
    """torch.cuda.Event stand-in (text_generation_controller.py:1163)."""

    def __init__(self, *args, **kwargs) -> None:
        self.t = 0.0

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _CpuEvent) -> float:
        return (end.t - self.t) * 1000.0


class _CpuStream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        # the all-to-all token dispatcher (token_dispatcher.py:895) synchronizes on the event it gets back
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"  # 175 call sites use it as device=
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    cuda.random.manual_seed = cuda.manual_seed
    cuda.synchronize = lambda *a, **k: None  # p2p_communication.py:398, dist-ckpt save
    cuda.Event = _CpuEvent
    stream = _CpuStream()
    cuda.current_stream = lambda device=None: stream
    cuda.default_stream = lambda device=None: stream
    cuda.Stream = _CpuStream
    cuda.stream = lambda s=None: contextlib.nullcontext()
    nv = cuda.nvtx
    nv.range_push = lambda *a, **k: 0
    nv.range_pop = lambda *a, **k: 0


def _patch_tensor_type() -> None:
    # clip_grads.py:167, optimizer.py:690, distrib_optimizer.py:431 insist on 'torch.cuda.*Tensor' types.
    orig = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kw):
        if dtype is None and not kw:
            t = orig(self)
            if self.device.type == "cpu" and t.startswith("torch.") and not t.startswith("torch.cuda."):
                return "torch.cuda." + t[len("torch.") :]
            return t
        return orig(self, dtype, non_blocking, **kw)

    torch.Tensor.type = type_


def _patch_megatron() -> None:
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.utils as tutils

    # tensor_parallel/random.py: CUDA RNG tracker states -> the CPU generator.
    tp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(
        new_state
    )

    # transformer/utils.py get_default_causal_mask: device="cuda".
    @functools.lru_cache
    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    tutils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask

    # inference/communication_utils.py:31 asserts tensor.is_cuda before PP sends.
    with contextlib.suppress(ImportError):
        import megatron.core.inference.communication_utils as comm

        comm._is_cuda = lambda tensor: None

    # distrib_optimizer.py:940: the torch-Adam fallback keeps a per-param 'step' the fully_reshardable
    # checkpoint does not store, and fp32 main params are views of model params (copy under no_grad).
    import megatron.core.optimizer.distrib_optimizer as dopt

    orig = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return orig(self, model_param, tensors)
        gi, go = self.model_param_group_index_map[model_param]
        main = self.optimizer.param_groups[gi]["params"][go]
        dst = {"param": main, **self.optimizer.state[main]}
        with torch.no_grad():
            for k, v in tensors.items():
                if k in dst and isinstance(dst[k], torch.Tensor) and dst[k].dim() > 0:
                    dst[k].copy_(v)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    # moe_utils.py:1093 maybe_move_tensor_to_cpu(as_numpy=True) turns CUDA split sizes into numpy arrays
    # for the all-to-all token dispatcher; a CPU tensor is returned as it is, and all_to_all_single refuses
    # a tensor as split sizes: give it the list of ints.
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as dispatcher

    orig_move = moe_utils.maybe_move_tensor_to_cpu

    def move(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.tolist()
        return orig_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move
    dispatcher.maybe_move_tensor_to_cpu = move


def moe_without_transformer_engine() -> None:
    """megatron-core 0.16.1's moe_utils.py:1192 reads ``te_general_gemm``, which it defines only when
    Transformer Engine imports (a NameError in the router otherwise, on CPU and on a GPU without TE): define
    it as absent, so the router takes its torch.mm branch. Idempotent; needed wherever TE is missing."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply() -> bool:
    """Install the patches (idempotent). Returns True when patches are active (no CUDA)."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*CPU RNG state changed within GPU RNG context.*")
    _patch_torch_cuda()
    _patch_tensor_type()
    _patch_megatron()
    _CudaToCpu().__enter__()  # process-wide, stays active
    _APPLIED = True
    logger.debug("megatron-core CPU compatibility patches applied")
    return True
