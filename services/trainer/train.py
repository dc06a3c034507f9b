"""The training entrypoint run by every rank: ``python -m services.trainer.train SPEC_JSON``.

(``hf-deepspeed`` specs go to ``services.trainer.hf_deepspeed``; everything below is megatron-core.)

megatron-core end to end: GPTModel chunks (local spec; CPU/gloo or GPU/nccl from the same code), DDP,
Megatron's optimizer (FP32 / mixed precision / distributed) with gradient clipping, LR warmup and
decay, the pipeline schedules (1F1B, interleaved), activation recomputation, and torch_dist
checkpoints with automatic resume. Rank wiring comes from RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT (set by the Ray driver, or torchrun). The last pipeline stage's first rank reports: one
``@@metrics {...}`` line per logged step, TensorBoard scalars, and ``<save_dir>/megastack-status.json``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llm.devices import module_device, to_device
from llm.mcore.packing import block_causal_mask, follow_positions, has_isolated_samples, set_positions
from services.trainer import checkpointing as ckpt
from services.trainer import heartbeat
from services.trainer.data import batches, build_datasets
from services.trainer.perf import flops_per_token, job_peak_tflops, rank_step_times
from services.trainer.reporting import Reporter
from services.trainer.spec import NEAT_PACK_TE, TrainSpec, check_save_dir, resolve_arch

logger = logging.getLogger("services.trainer.train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _config(spec: TrainSpec, arch):
    from llm.mcore.model import transformer_config

    extra = {}
    if spec.recompute == "full":
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif spec.recompute == "selective":
        extra.update(recompute_granularity="selective")
    if spec.num_layer_list:  # validate() checked the shape: the middle stages share the other layers evenly
        extra.update(
            num_layers_in_first_pipeline_stage=spec.num_layer_list[0],
            num_layers_in_last_pipeline_stage=spec.num_layer_list[-1],
        )
    if arch.moe:  # the router's load-balancing loss as the spec weighs it; the grouped GEMM where asked
        extra.update(moe_aux_loss_coeff=spec.moe_aux_loss_coeff, moe_grouped_gemm=spec.moe_grouped_gemm)
        extra.update(expert_model_parallel_size=spec.ep)
        if spec.moe_capacity_factor:  # tokens beyond an expert's capacity dropped, lowest probability first
            extra.update(moe_expert_capacity_factor=spec.moe_capacity_factor, moe_token_drop_policy="probs")
    return transformer_config(
        arch,
        tp=spec.tp,
        pp=spec.pp,
        vpp=spec.vpp if spec.vpp > 1 else None,
        params_dtype=DTYPES[spec.precision],
        sequence_parallel=spec.sequence_parallel,
        **extra,
    )


def packed_impl(spec: TrainSpec) -> str:
    """The transformer implementation for this job's data: neat-packed SFT needs the explicit block-diagonal
    mask, which megatron-core's local spec applies; TE's attention would ignore it under its causal mask type
    (its packed-sequence path is not wired here yet), so ``auto`` picks the local spec and
    ``transformer_engine`` is refused (at submit too: spec.check_packing)."""
    from services.trainer.datafiles import neat_packed

    if spec.kind != "sft" or not neat_packed([p for p, _ in (*spec.data_paths, *spec.valid_data_paths)]):
        return spec.transformer_impl
    if spec.transformer_impl == "transformer_engine":
        raise ValueError(NEAT_PACK_TE)
    logger.info(
        "neat-packed SFT data: samples kept apart by an explicit mask on megatron-core's local layer spec"
    )
    return "local"


def build(spec: TrainSpec):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from llm.mcore.model import build_gpt_model, padded_vocab_size

    arch, _, tok_dir = resolve_arch(spec)
    config = _config(spec, arch)
    impl = packed_impl(spec)
    vocab = padded_vocab_size(arch.vocab_size, 128, spec.tp)
    chunks = []
    for v in range(spec.vpp):
        vp = v if spec.vpp > 1 else None
        chunks.append(
            build_gpt_model(
                arch,
                config,
                vocab_size=vocab,
                vp_stage=vp,
                impl=impl,
                max_sequence_length=max(spec.seq_length, arch.max_position_embeddings),
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            )
        )
    for m in chunks:
        follow_positions(m)  # RoPE at the per-sample positions of neat packs
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=spec.distributed_optimizer,
        overlap_grad_reduce=False,
    )
    if (
        spec.precision != "fp32"
    ):  # Megatron's get_model: the half-precision copy, inputs cast in, outputs cast out
        from megatron.core.transformer.module import Float16Module

        wrapped = [Float16Module(config, m) for m in chunks]
    else:
        wrapped = chunks
    ddp = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
        for i, m in enumerate(wrapped)
    ]
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=spec.lr,
        min_lr=spec.min_lr,
        weight_decay=spec.weight_decay,
        adam_beta1=spec.adam_beta1,
        adam_beta2=spec.adam_beta2,
        adam_eps=spec.adam_eps,
        clip_grad=spec.clip_grad,
        bf16=spec.precision == "bf16",
        fp16=spec.precision == "fp16",
        params_dtype=DTYPES[spec.precision],
        use_distributed_optimizer=spec.distributed_optimizer,
        initial_loss_scale=2.0**16 if spec.precision == "fp16" else None,
    )
    optimizer = get_megatron_optimizer(opt_config, ddp)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if spec.lr_warmup_iters else spec.lr,
        max_lr=spec.lr,
        min_lr=spec.min_lr,
        lr_warmup_steps=spec.lr_warmup_iters,
        lr_decay_steps=spec.lr_decay_iters or spec.train_iters,
        lr_decay_style=spec.lr_decay_style,
        start_wd=spec.weight_decay,
        end_wd=spec.weight_decay,
        wd_incr_steps=spec.train_iters,
        wd_incr_style="constant",
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [m.no_sync for m in ddp] if len(ddp) > 1 else ddp[0].no_sync
    return arch, tok_dir, chunks, ddp, optimizer, scheduler


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    # decided on the loader's CPU tensors: on the device, reading the max would stall every micro-batch on
    # a sync
    isolate = "segment_ids" in batch and has_isolated_samples(batch["segment_ids"])
    batch = to_device(batch, module_device(model))
    if isolate:  # neat packs: each sample sees only itself
        attention_mask = block_causal_mask(batch["segment_ids"])
        set_positions(model, batch["position_ids"])
    else:
        attention_mask = None
        set_positions(model, None)
    output = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"])
    mask = batch["loss_mask"].float()

    def loss_func(output_tensor: torch.Tensor):
        loss = (output_tensor.float() * mask).sum() / mask.sum().clamp(min=1.0)
        # clone: the schedule divides `loss` in place by the number of micro-batches afterwards
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def _mean_loss(losses: list[dict]) -> torch.Tensor | None:
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    from llm.mcore.model import megatron_device

    value = (
        torch.stack([x["lm loss"] for x in losses]).mean()
        if losses
        else torch.zeros((), device=megatron_device())
    )
    value = value.clone().float()
    dist.all_reduce(value, group=ps.get_data_parallel_group())
    return value / ps.get_data_parallel_world_size()


def run(spec: TrainSpec) -> int:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from llm.mcore import dist as mdist

    torch.set_num_threads(spec.num_threads or max(1, int(spec.cpus_per_worker)))
    mdist.init(
        mdist.Parallelism(tp=spec.tp, pp=spec.pp, vpp=spec.vpp if spec.vpp > 1 else None, ep=spec.ep),
        backend=spec.backend or None,
        seed=spec.seed,
    )
    torch.manual_seed(spec.seed)
    rank = dist.get_rank()
    arch, tok_dir, chunks, ddp, optimizer, scheduler = build(spec)
    save_dir = Path(spec.save_dir)
    if rank == 0:
        check_save_dir(spec)  # again here: the folder may have changed since the job was submitted
        save_dir.mkdir(parents=True, exist_ok=True)
        for name in ckpt.discard_partial(save_dir):
            logger.info("removed %s, a checkpoint an earlier attempt did not finish", name)
        from llm.mcore.model import padded_vocab_size

        ckpt.describe(save_dir, spec, arch, tok_dir, padded_vocab_size(arch.vocab_size, 128, spec.tp))
    dist.barrier()
    heartbeat.beat(
        spec.save_dir, rank, force=True
    )  # the driver's hang watch counts from here (and from the attempt's start)
    iteration, consumed = 0, 0
    latest = None if spec.no_resume else ckpt.latest_iteration(save_dir)
    if latest is not None:
        iteration, consumed = ckpt.load(
            save_dir, latest, models=chunks, optimizer=optimizer, scheduler=scheduler
        )
        logger.info(
            "resumed from %s at step %d (%d samples consumed)",
            save_dir / ckpt.iter_name(latest),
            iteration,
            consumed,
        )
    elif spec.init_from:
        ckpt.load_weights(Path(spec.init_from), chunks)
        logger.info("initialised from %s", spec.init_from)
    from llm.tokenizers import FastTokenizer

    tok = FastTokenizer.from_dir(tok_dir)
    pad = tok.pad_id if tok.pad_id is not None else tok.eod_id
    train_ds, valid_ds = build_datasets(spec, tok_dir, pad)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    total = spec.train_iters * spec.global_batch_size

    def iterators(ds, start: int):
        its = [
            batches(
                ds,
                consumed=start,
                micro_batch_size=spec.micro_batch_size,
                dp_rank=dp_rank,
                dp_size=dp_size,
                total=total,
            )
            for _ in chunks
        ]
        return its if len(its) > 1 else its[0]

    data = iterators(train_ds, consumed)
    heartbeat.beat(spec.save_dir, rank, force=True)
    fb = get_forward_backward_func()
    reporter = Reporter(
        spec,
        ps.is_pipeline_last_stage(ignore_virtual=True)
        and ps.get_tensor_model_parallel_rank() == 0
        and dp_rank == 0,
    )
    reporter.last_checkpoint = latest or 0
    saver = ckpt.Saver(save_dir, keep_last=spec.keep_last, async_save=spec.async_save)
    per_token = flops_per_token(arch, spec.seq_length)
    tokens_per_step = spec.global_batch_size * spec.seq_length
    from llm.mcore.model import megatron_device

    device = megatron_device()
    peak = job_peak_tflops(spec.peak_tflops_per_worker, DTYPES[spec.precision], device)
    logger.info(
        "MFU is measured against %.3g TFLOP/s for the job (%s)",
        peak,
        "resources.peak_tflops_per_worker" if spec.peak_tflops_per_worker else "GEMM peak each rank measured",
    )
    while iteration < spec.train_iters:
        t0 = time.perf_counter()
        for m in ddp:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        losses = fb(
            forward_step_func=_forward_step,
            data_iterator=data,
            model=ddp,
            num_microbatches=spec.num_microbatches,
            seq_length=spec.seq_length,
            micro_batch_size=spec.micro_batch_size,
            decoder_seq_length=spec.seq_length,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        iteration += 1
        consumed += spec.global_batch_size
        loss = _mean_loss(losses)
        heartbeat.beat(spec.save_dir, rank)
        dt = time.perf_counter() - t0
        tflops = per_token * tokens_per_step / dt / 1e12
        metrics = {
            "step": iteration,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm or 0.0),
            "step_time_s": dt,
            "tokens_per_s": tokens_per_step / dt,
            "tflops": tflops,
            "mfu": tflops / peak,
            "peak_tflops": peak,
            "loss_scale": float(optimizer.get_loss_scale()),
            "skipped": not ok,
        }
        if iteration % spec.log_interval == 0 or iteration == spec.train_iters:  # every rank: a collective
            metrics["rank_step_time_s"] = rank_step_times(dt, device)
        if loss is not None:
            metrics["loss"] = float(loss)
        if spec.eval_interval and valid_ds is not None and iteration % spec.eval_interval == 0:
            metrics["valid_loss"] = _evaluate(spec, fb, ddp, valid_ds, dp_rank, dp_size)
        if iteration % spec.log_interval == 0 or iteration == spec.train_iters:
            reporter.step(metrics)
        saver.poll()  # publishes background saves that are done (a collective: every rank, every step)
        if (spec.save_interval and iteration % spec.save_interval == 0) or iteration == spec.train_iters:
            heartbeat.beat(spec.save_dir, rank, force=True)
            took = saver.save(
                iteration, models=chunks, optimizer=optimizer, scheduler=scheduler, consumed_samples=consumed
            )
            heartbeat.beat(spec.save_dir, rank, force=True)
            logger.info(
                "%s checkpoint %s: the step loop waited %.2fs",
                "scheduled" if spec.async_save else "saved",
                ckpt.iter_name(iteration),
                took,
            )
        reporter.last_checkpoint = saver.last_published or reporter.last_checkpoint
    saver.wait()
    heartbeat.beat(spec.save_dir, rank, force=True)
    reporter.last_checkpoint = saver.last_published or reporter.last_checkpoint
    reporter.step({**metrics, "done": True})
    mdist.shutdown()
    return 0


def _evaluate(spec, fb, ddp, valid_ds, dp_rank, dp_size) -> float:
    its = [
        batches(
            valid_ds, consumed=0, micro_batch_size=spec.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size
        )
        for _ in ddp
    ]
    values = []
    for m in ddp:
        m.eval()
    with torch.no_grad():
        for _ in range(spec.eval_iters):
            out = fb(
                forward_step_func=_forward_step,
                data_iterator=its if len(its) > 1 else its[0],
                model=ddp,
                num_microbatches=spec.num_microbatches,
                seq_length=spec.seq_length,
                micro_batch_size=spec.micro_batch_size,
                decoder_seq_length=spec.seq_length,
                forward_only=True,
            )
            loss = _mean_loss(out)
            if loss is not None:
                values.append(float(loss))
    for m in ddp:
        m.train()
    return sum(values) / len(values) if values else float("nan")


def main(argv: list[str]) -> int:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    # "-": the spec comes on stdin (the Ray rank actor pipes it, so a killed actor leaves no file behind)
    spec = TrainSpec.from_json(sys.stdin.read() if argv[0] == "-" else Path(argv[0]).read_text())
    if spec.kind != "hf-deepspeed":
        from llm.mcore.cpu_compat import import_megatron_without_compiled_fusions

        import_megatron_without_compiled_fusions()  # CPU ranks only; a no-op with CUDA
    if spec.kind == "hf-deepspeed":  # an HF model under DeepSpeed ZeRO, not megatron-core
        from services.trainer import hf_deepspeed

        return hf_deepspeed.run(spec)
    return run(spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
