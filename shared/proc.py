"""Process lifetime helpers shared by the trainer's rank launcher and its checkpoint writers."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the calling process SIGKILLed when the thread that started it exits (Linux PR_SET_PDEATHSIG);
    elsewhere nothing happens. For children that must not outlive a rank: its training process, its checkpoint
    writers."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux (no libc.so.6): orphans finish their work and exit
        pass
