"""Device rules (run by `make lint`) for the modules whose tensors meet a model that may sit on a GPU:
the serving engine, the trainer's step, converter verify, llm/mcore and gpu_check.

1. ``torch.Generator(...)`` names its device (a CPU generator cannot draw for CUDA tensors).
2. Tensor factories (``torch.tensor``, ``zeros``, ``ones``, ``empty``, ``full``, ``arange``, ``rand*``, ...)
   name their ``device=``: a tensor made without one lands on the CPU, and is a bug on a GPU unless said so
   (write ``device="cpu"`` or ``device=torch.device("cpu")`` where the CPU is meant).

``*_like`` factories, ``.to(...)`` and arithmetic inherit a device and are fine.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    "services/textgen/engine.py",
    "services/textgen/sampling.py",
    "services/textgen/modeling.py",
    "services/trainer/train.py",
    "services/converter/verify.py",
    "llm/mcore/model.py",
    "llm/devices.py",
    "tools/gpu_check.py",
)
FACTORIES = {
    "tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "randperm",
    "linspace",
    "logspace",
    "eye",
    "as_tensor",
    "Generator",
}


def problems_in(source: str, name: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source, name)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f = node.func
        if not (isinstance(f.value, ast.Name) and f.value.id == "torch" and f.attr in FACTORIES):
            continue
        if any(k.arg == "device" for k in node.keywords) or any(k.arg is None for k in node.keywords):
            continue  # device=..., or **kwargs that carry it
        what = "a generator" if f.attr == "Generator" else "a tensor"
        out.append(f"{name}:{node.lineno}: torch.{f.attr}(...) makes {what} without device=; name the device")
    return out


def main() -> int:
    problems = []
    for rel in MODULES:
        path = ROOT / rel
        if path.is_file():
            problems += problems_in(path.read_text(), rel)
    for p in problems:
        print(p, file=sys.stderr)  # noqa: T201
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
