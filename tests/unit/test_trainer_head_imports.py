"""The trainer service's head (servicer, launcher) reads what jobs write through services/trainer/jobfiles.py
and loads none of the rank-side stack: no torch, no megatron-core, no Ray placement code."""

import subprocess
import sys

import pytest

from shared.paths import REPO_ROOT

pytestmark = pytest.mark.unit


def test_the_trainer_head_imports_no_rank_side_code():
    probe = (
        "import sys, services.trainer.servicer, services.trainer.launcher, services.trainer.wire; "
        "print(sorted(m for m in ('torch', 'megatron', 'ray.util.placement_group', 'services.trainer.train', "
        "'services.trainer.ray_driver', 'services.trainer.data') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
