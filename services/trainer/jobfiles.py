"""What a training job writes into its save folder and the trainer service reads back: the one contract
between the rank-side code (train, ray_driver, checkpointing, heartbeat) and the service's head (launcher),
which imports only this module from that side (no torch, no megatron-core, no Ray cluster code)."""

from pathlib import Path

STATUS_FILE = "megastack-status.json"  # last logged step's metrics (train.Reporter), atomically replaced
METRICS_FILE = "metrics.jsonl"  # every logged step, across restarts
ATTEMPT_FILE = (
    "megastack-attempt.json"  # the Ray driver's current attempt: number, pids, why the last one ended
)
SAVES_FILE = (
    "megastack-saves.jsonl"  # one line per published checkpoint: blocked_s, written_s (checkpointing.Saver)
)
HEARTBEAT_DIR = (
    ".megastack-heartbeat"  # rank-<N> files: the wall time of the rank's last progress (heartbeat)
)
RESOURCE_WAIT_ENV = "MEGASTACK_RESOURCE_WAIT_S"  # set by the launcher from MEGASTACK_TRAINER_RESOURCE_WAIT_S
# + iter_XXXXXXX: the trainer service is exporting that checkpoint; rotation keeps it meanwhile
HOLD_PREFIX = ".megastack-hold-"
EVAL_EXPORT_DIR = "hf-evaluations"  # iter_XXXXXXX/: HF exports of the checkpoints spec.evaluate scores


def iter_name(iteration: int) -> str:
    """The folder of one saved checkpoint (Megatron's layout)."""
    return f"iter_{iteration:07d}"


def hold_file(save_dir: str | Path, iteration: int) -> Path:
    """The file that keeps checkpoint ``iteration`` from rotation while the service exports it."""
    return Path(save_dir) / f"{HOLD_PREFIX}{iter_name(iteration)}"
