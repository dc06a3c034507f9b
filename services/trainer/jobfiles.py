"""What a training job writes into its save folder and the trainer service reads back: the one contract
between the rank-side code (train, ray_driver, checkpointing, heartbeat) and the service's head (launcher),
which imports only this module from that side (no torch, no megatron-core, no Ray cluster code)."""

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
