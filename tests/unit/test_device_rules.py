"""The device rules of tools/check_devices.py hold in the repository, and the checker catches what it
should."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shared.paths import REPO_ROOT
from tools.check_devices import problems_in


def test_device_rules_hold_in_the_repository():
    out = subprocess.run(
        [sys.executable, "tools/check_devices.py"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    "line",
    [
        "g = torch.Generator()",
        "g = torch.Generator().manual_seed(3)",
        "x = torch.zeros((2, 3), dtype=torch.long)",
        "x = torch.tensor([1, 2])",
        "x = torch.arange(5)",
        "x = torch.randint(0, 9, (4,), generator=g)",
    ],
)
def test_checker_flags_tensors_and_generators_without_a_device(line):
    found = problems_in(line + "\n", "m.py")
    assert len(found) == 1 and "m.py:1" in found[0] and "device=" in found[0]


@pytest.mark.parametrize(
    "line",
    [
        "g = torch.Generator(device=dev)",
        "x = torch.zeros((2, 3), dtype=torch.long, device=x.device)",
        "x = torch.tensor([1, 2], device='cpu')",
        "x = torch.zeros_like(y)",
        "x = y.to(dev)",
        "x = torch.arange(5, **where)",
    ],
)
def test_checker_accepts_tensors_with_a_device(line):
    assert problems_in(line + "\n", "m.py") == []
