"""The rank of an ``hf-deepspeed`` job: an HF causal LM trained with DeepSpeed ZeRO on instruction records.

This is the Pai-Megatron-Patch guide's second flow (``run_ds_train_huggingface_llama.sh``) as a job
kind: the HF model folder, JSON/JSONL records with prompt-masked labels (``hf_data``), ZeRO stage
0-3, bf16/fp16, gradient checkpointing, micro batch and gradient accumulation, Megatron's LR
schedule. The Ray driver starts one process per rank exactly as for the megatron-core kinds
(RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; gloo on CPU, NCCL on GPUs), and this module reports
through the same status file, heartbeat and ``@@metrics`` lines.

Checkpoints are DeepSpeed's own (``global_stepN/`` and the ``latest`` tag, saved by every rank); an
attempt resumes from ``latest`` and, because the data order is a function of the step
(``hf_data.Samples``), continues the same curve. ``checkpoint.export_hf_dir`` gets the model as HF
safetensors at the end (``llm.checkpoints.deepspeed.export_hf``).

The optimizer is torch's AdamW with two parameter groups (no weight decay for biases and norms), built
here and handed to DeepSpeed: a DeepSpeed ``optimizer`` block would decay every parameter, and its
own CPU Adam compiles for minutes. :func:`train` also runs plain torch DDP with the same data, model
and optimizer (``engine="ddp"``): the reference the ZeRO tests and the training bench compare with.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from llm.checkpoints.deepspeed import MODEL_INFO, step_folders, step_of, tag_of
from services.trainer import heartbeat
from services.trainer.hf_data import Samples, lr_factor, masked_loss, total_steps
from services.trainer.reporting import Reporter
from services.trainer.spec import TrainSpec, check_save_dir
from shared.atomic import mark_output

logger = logging.getLogger("services.trainer.hf_deepspeed")


def on_gpu(spec: TrainSpec) -> bool:
    return spec.gpus_per_worker > 0


def ds_config(spec: TrainSpec, world: int, num_params: int) -> dict:
    """The DeepSpeed config of a spec. Buckets are sized to the model: DeepSpeed's default 5e8 elements
    allocate ~2 GB per step whatever the model (measured: 0.6 vs 40 steps/s on a tiny model on CPU)."""
    bucket = int(spec.bucket_size or max(num_params, 1))
    zero: dict = {
        "stage": spec.zero_stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "contiguous_gradients": True,
        "overlap_comm": False,
    }
    if spec.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=0)
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": spec.global_batch_size,
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.global_batch_size // (spec.micro_batch_size * world),
        "gradient_clipping": spec.clip_grad,  # DeepSpeed clips at 1.0 when it is not set
        "zero_optimization": zero,
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": {"enabled": spec.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch AdamW, on purpose (module docstring)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices only: biases and norm weights (1-D) are not decayed (as Megatron and HF do)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_model(spec: TrainSpec):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec.hf_model, dtype=torch.float32)
    model.config.use_cache = False
    if spec.recompute == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _optimizer(spec: TrainSpec, model, total: int):
    opt = torch.optim.AdamW(
        param_groups(model, spec.weight_decay),
        lr=spec.lr,
        betas=(spec.adam_beta1, spec.adam_beta2),
        eps=spec.adam_eps,
    )
    decay = spec.lr_decay_iters or total
    factor = {
        "warmup": spec.lr_warmup_iters,
        "decay_steps": decay,
        "style": spec.lr_decay_style,
        "min_ratio": spec.min_lr / spec.lr if spec.lr else 0.0,
    }
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, **factor))
    return opt, sched


class _DDP:
    """Plain torch DDP behind the few engine calls the loop makes (the reference for ZeRO)."""

    def __init__(self, spec: TrainSpec, model, opt, sched, device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.module = DistributedDataParallel(model.to(device))
        self.optimizer, self.sched, self.spec = opt, sched, spec  # `optimizer`: the engine's name for it
        self.ga = 1
        self.micro = 0
        self.device = device

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.ga).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.ga:
            return
        self.last_grad_norm = float(
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.spec.clip_grad)
        )
        self.optimizer.step()
        self.sched.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float:
        return self.last_grad_norm


def _init_distributed(spec: TrainSpec) -> None:
    torch.set_num_threads(spec.num_threads or max(1, int(spec.cpus_per_worker)))
    backend = spec.backend or ("nccl" if on_gpu(spec) else "gloo")
    if not on_gpu(spec):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not on_gpu(spec):
        # DeepSpeed's CPU all-reduce JIT-compiles a shared-memory op at start (a C++ compiler, ~70 s);
        # the job uses gloo's collectives as asked, and the loss curve is gloo's (= plain DDP's).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend)


def build_engine(spec: TrainSpec, engine: str, total: int):
    """(engine, device): DeepSpeed's engine around model + AdamW + schedule, or the plain DDP reference."""
    model = load_model(spec)
    opt, sched = _optimizer(spec, model, total)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu(spec) else None
    if engine == "ddp":
        eng = _DDP(spec, model, opt, sched, device or torch.device("cpu"))
        eng.ga = spec.global_batch_size // (spec.micro_batch_size * dist.get_world_size())
        return eng, eng.device
    import deepspeed

    num_params = sum(p.numel() for p in model.parameters())
    eng, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        config=ds_config(spec, dist.get_world_size(), num_params),
    )
    return eng, eng.device


def discard_partial(save_dir: Path) -> list[str]:
    """``global_stepN`` folders newer than the ``latest`` tag: saves an earlier attempt did not finish
    (DeepSpeed writes ``latest`` last). Only DeepSpeed's step folder names are touched (rank 0)."""
    latest = latest_step(save_dir) or 0
    gone = []
    for n, p in step_folders(save_dir).items():
        if n > latest:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def latest_step(save_dir: Path) -> int | None:
    try:
        return step_of((Path(save_dir) / "latest").read_text().strip())
    except OSError:
        return None


def _keep_last(save_dir: Path, keep: int) -> None:
    folders = step_folders(save_dir)
    latest = latest_step(save_dir)
    for n in sorted(folders)[:-keep] if keep > 0 else []:
        if n != latest:
            shutil.rmtree(folders[n], ignore_errors=True)


def describe(save_dir: Path, spec: TrainSpec, world: int) -> None:
    """megastack.json and the model's config and tokenizer files (``hf_model/``: MODEL_INFO) in the save
    folder, so the converter turns a checkpoint into HF on its own (rank 0, at start)."""
    info = save_dir / MODEL_INFO
    info.mkdir(exist_ok=True)
    for f in Path(spec.hf_model).iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".index.json")):
            shutil.copyfile(f, info / f.name)
    meta = {
        "format": "deepspeed",
        "created_by": "megastack trainer",
        "created_unix_s": time.time(),
        "job": spec.name,
        "kind": spec.kind,
        "hf_model": spec.hf_model,
        "zero_stage": spec.zero_stage,
        "world_size": world,
        "precision": spec.precision,
    }
    (save_dir / "megastack.json").write_text(json.dumps(meta, indent=1) + "\n")
    mark_output(save_dir)


def train(spec: TrainSpec, *, engine: str = "deepspeed", on_step=None, on_end=None) -> list[float]:
    """Run the job's steps on this rank (the process group is up); returns the loss of each step run.
    ``on_end(engine, samples, device)`` is called on every rank after the last step (a collective with
    ZeRO-3: what the tests use to read the trained model)."""
    from llm.tokenizers import FastTokenizer

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(spec.seed)
    tok = FastTokenizer.from_dir(Path(spec.tokenizer or spec.hf_model))
    samples = Samples.from_files(spec.data_files, tok, spec.seq_length)
    valid = Samples.from_files(spec.valid_data_files, tok, spec.seq_length) if spec.valid_data_files else None
    cut = samples.unanswered()
    if cut and rank == 0:
        logger.warning(
            "%d of %d records keep no answer token within data.seq_length=%d (their prompts fill it); "
            "they take part in batches but train nothing",
            cut,
            len(samples),
            spec.seq_length,
        )
    total = total_steps(spec.train_iters, spec.epochs, len(samples), spec.global_batch_size)
    eng, device = build_engine(spec, engine, total)
    save_dir = Path(spec.save_dir)
    saving = engine == "deepspeed"
    step = 0
    if saving:
        if rank == 0:
            check_save_dir(spec)
            save_dir.mkdir(parents=True, exist_ok=True)
            for name in discard_partial(save_dir):
                logger.info("removed %s, a checkpoint an earlier attempt did not finish", name)
            describe(save_dir, spec, world)
        dist.barrier()
        if not spec.no_resume and latest_step(save_dir) is not None:
            path, state = eng.load_checkpoint(str(save_dir))
            step = int((state or {}).get("step", latest_step(save_dir)))
            logger.info("resumed from %s at step %d", path, step)
    heartbeat.beat(spec.save_dir, rank, force=True)
    reporter = Reporter(spec, rank == 0 and saving, total_steps=total)
    reporter.last_checkpoint = step
    losses = []
    while step < total:
        t0 = time.perf_counter()
        micro = samples.micro_batches(
            step,
            seed=spec.seed,
            global_batch_size=spec.global_batch_size,
            micro_batch_size=spec.micro_batch_size,
            rank=rank,
            world=world,
        )
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # [tokens (not padding), loss sum]
        for mb in micro:
            mb = {k: v.to(device) for k, v in mb.items()}
            labels = mb.pop("labels")
            loss = masked_loss(eng(**mb).logits, labels)
            eng.backward(loss)
            eng.step()
            sums += torch.stack([mb["attention_mask"].sum().double(), loss.detach().double()])
        step += 1
        dist.all_reduce(sums)
        loss_value = float(sums[1]) / (len(micro) * world)  # the mean of the micro-batches' losses
        losses.append(loss_value)
        heartbeat.beat(spec.save_dir, rank)
        dt = time.perf_counter() - t0
        grad_norm = eng.get_global_grad_norm()
        metrics = {
            "step": step,
            "loss": loss_value,
            "lr": eng.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm or 0.0),
            "step_time_s": dt,
            "tokens_per_s": float(sums[0]) / dt,  # the records' tokens, padding left out
        }
        if spec.eval_interval and valid is not None and step % spec.eval_interval == 0:
            metrics["valid_loss"] = evaluate(spec, eng, valid, device)
        if on_step is not None:
            on_step(step, metrics)
        if step % spec.log_interval == 0 or step == total:
            reporter.step(metrics)
        if saving and ((spec.save_interval and step % spec.save_interval == 0) or step == total):
            heartbeat.beat(spec.save_dir, rank, force=True)
            eng.save_checkpoint(str(save_dir), tag=tag_of(step), client_state={"step": step})
            dist.barrier()
            if rank == 0:
                _keep_last(save_dir, spec.keep_last)
            reporter.last_checkpoint = step
            heartbeat.beat(spec.save_dir, rank, force=True)
    if on_end is not None:
        with torch.no_grad():
            on_end(eng, samples, device)
    if saving and spec.export_hf_dir and total:
        dist.barrier()
        if rank == 0:
            from llm.checkpoints.deepspeed import export_hf

            export_hf(save_dir, Path(spec.export_hf_dir), inputs=[Path(spec.hf_model)])
            logger.info("exported the model to %s (HF safetensors)", spec.export_hf_dir)
        dist.barrier()
    if saving and losses:
        reporter.step({**metrics, "done": True})
    return losses


def evaluate(spec: TrainSpec, eng, valid: Samples, device) -> float:
    """Mean loss per labelled token over the validation records (``eval_iters`` micro-batches per rank,
    0 = all); every rank runs the same number of forwards (ZeRO-3 gathers parameters in each)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = len(valid) // (spec.micro_batch_size * world)
    if spec.eval_iters:
        per_rank = min(per_rank, spec.eval_iters)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, labelled tokens]
    module = getattr(eng, "module", eng)
    module.eval()
    with torch.no_grad():
        for b in range(per_rank):
            start = (b * world + rank) * spec.micro_batch_size
            mb = {
                k: v.to(device)
                for k, v in valid.collate(list(range(start, start + spec.micro_batch_size))).items()
            }
            labels = mb.pop("labels")
            count = (labels[:, 1:] != -100).sum()
            sums += torch.stack([masked_loss(eng(**mb).logits, labels).double() * count, count.double()])
    module.train()
    dist.all_reduce(sums)
    return float(sums[0] / sums[1].clamp(min=1))


def run(spec: TrainSpec) -> int:
    """The rank's entrypoint (``services.trainer.train`` dispatches ``hf-deepspeed`` specs here)."""
    _init_distributed(spec)
    train(spec)
    dist.destroy_process_group()
    return leave(0)


def leave(code: int) -> NoReturn:
    """End the rank now that everything it writes is on disk. Once in about ten CPU runs the interpreter's
    teardown aborted (SIGABRT, "terminate called without an active exception": a native thread of the
    process-group stack still joinable when its owner was destroyed) after the last checkpoint, export and
    status line were written, failing a finished job; the rank therefore skips the teardown."""
    import sys

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """``python -m services.trainer.hf_deepspeed SPEC_JSON [--engine ddp] [--losses FILE]`` under torchrun:
    the rank loop with DeepSpeed or the plain DDP reference, rank 0 writing the loss of each step as JSON
    (what the ZeRO-vs-DDP tests and the training bench compare)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m services.trainer.hf_deepspeed", description=main.__doc__)
    ap.add_argument("spec", help="a TrainSpec JSON file (kind hf-deepspeed)")
    ap.add_argument("--engine", choices=("deepspeed", "ddp"), default="deepspeed")
    ap.add_argument(
        "--losses", default="", help="rank 0 writes {'losses', 'step_times', 'peak_rss_mb' (per rank)} here"
    )
    ap.add_argument(
        "--probe",
        default="",
        help="rank 0 saves the trained model's logits on the first record here (torch.save)",
    )
    args = ap.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    spec = TrainSpec.from_json(Path(args.spec).read_text())
    _init_distributed(spec)
    probe: dict[str, torch.Tensor] = {}

    def read_logits(eng, samples: Samples, device) -> None:
        first = samples.collate([0])
        probe["logits"] = eng(
            input_ids=first["input_ids"].to(device), attention_mask=first["attention_mask"].to(device)
        ).logits

    step_times: list[float] = []
    losses = train(
        spec,
        engine=args.engine,
        on_step=lambda _, m: step_times.append(m["step_time_s"]),
        on_end=read_logits if args.probe else None,
    )
    if args.probe and dist.get_rank() == 0:
        torch.save(probe["logits"].detach().float().cpu(), args.probe)
    peak = torch.tensor([_peak_rss_mb()], dtype=torch.float64)
    peaks = [torch.zeros_like(peak) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    if args.losses and dist.get_rank() == 0:
        Path(args.losses).write_text(
            json.dumps({"losses": losses, "step_times": step_times, "peak_rss_mb": [float(p) for p in peaks]})
        )
    dist.destroy_process_group()
    return leave(0)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


if __name__ == "__main__":
    raise SystemExit(main())
