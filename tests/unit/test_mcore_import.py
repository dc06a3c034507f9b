"""llm.mcore.cpu_compat.import_megatron_without_compiled_fusions: CPU ranks import megatron-core with its
``@jit_fuser`` helpers eager (no TorchDynamo/Inductor import, no compile on first use)."""

from __future__ import annotations

import subprocess
import sys

from shared.paths import REPO_ROOT

PROBE = """
import sys, torch
from llm.mcore.cpu_compat import import_megatron_without_compiled_fusions as f
real = torch.compile
applied = f()
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu as s
print(applied, f(), torch.compile is real, jit.jit_fuser is real, "torch._dynamo" in sys.modules,
      type(s.bias_swiglu).__name__)
"""


def test_cpu_ranks_import_megatron_with_eager_fusions_and_torch_compile_restored():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    applied, again, restored, compiled, dynamo, helper = out.stdout.split()
    # applied once (the second call finds megatron-core loaded), torch.compile itself is left as it was,
    # megatron-core's fuser is not it, TorchDynamo was never imported, the helper is the plain function
    assert (applied, again, restored, compiled, dynamo, helper) == (
        "True",
        "False",
        "True",
        "False",
        "False",
        "function",
    )
