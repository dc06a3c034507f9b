"""Train a spec in one process and SIGKILL it right after the background save of iteration N was scheduled.

    python tests/helpers/die_during_async_save.py SPEC_JSON N

The writer process forked by megatron-core's async save is still writing when its trainer dies; nothing
publishes that checkpoint, so the previous one must stay the latest.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    spec_path, die_at = sys.argv[1], int(sys.argv[2])
    from services.trainer import checkpointing as ckpt
    from services.trainer.train import main as train_main

    real_save = ckpt.Saver.save

    def save_then_die(self, iteration, **kw):
        blocked = real_save(self, iteration, **kw)
        if iteration == die_at:
            assert self.in_flight == 1, "the save was not in the background"
            os.kill(os.getpid(), signal.SIGKILL)
        return blocked

    ckpt.Saver.save = save_then_die
    return train_main([spec_path])


if __name__ == "__main__":
    sys.exit(main())
