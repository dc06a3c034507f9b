"""What a training job reports at each logged step: a ``@@metrics`` log line, TensorBoard scalars and
``<save_dir>/megastack-status.json`` (which the launcher follows), plus the whole curve in the metrics file.
One rank reports; the megatron-core ranks (train.py) and the HF + DeepSpeed ranks (hf_deepspeed.py) alike."""

from __future__ import annotations

import json
import time
from pathlib import Path

from services.trainer.jobfiles import METRICS_FILE, STATUS_FILE
from services.trainer.spec import TrainSpec
from shared.atomic import write_text_atomic


class Reporter:
    """Metrics from the reporting rank: log line, TensorBoard, status file."""

    def __init__(self, spec: TrainSpec, enabled: bool, total_steps: int = 0) -> None:
        self.spec, self.enabled = spec, enabled
        self.total_steps = total_steps or spec.train_iters
        self.path = Path(spec.save_dir) / STATUS_FILE
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(spec.save_dir) / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.tb = None
        self.last_checkpoint = 0

    def step(self, metrics: dict) -> None:
        if not self.enabled:
            return
        metrics = {
            **metrics,
            "last_checkpoint_step": self.last_checkpoint,
            "train_iters": self.total_steps,
            "updated_unix_s": time.time(),
        }
        print("@@metrics " + json.dumps(metrics), flush=True)  # noqa: T201 - the job log carries the curve
        write_text_atomic(self.path, json.dumps(metrics))
        with open(self.path.with_name(METRICS_FILE), "a") as f:  # the whole curve, across restarts
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            step = metrics["step"]
            for tag, key in (
                ("lm-loss", "loss"),
                ("learning-rate", "lr"),
                ("grad-norm", "grad_norm"),
                ("throughput/tokens_per_s", "tokens_per_s"),
                ("throughput/tflops", "tflops"),
                ("throughput/mfu", "mfu"),
                ("loss-scale", "loss_scale"),
                ("time/step_s", "step_time_s"),
                ("validation/lm-loss", "valid_loss"),
            ):
                if key in metrics:
                    self.tb.add_scalar(tag, metrics[key], step)
            for r, seconds in enumerate(metrics.get("rank_step_time_s", ())):
                self.tb.add_scalar(f"time/step_s/rank{r}", seconds, step)
            self.tb.flush()
