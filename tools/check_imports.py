"""Import rules (run by `make lint`):

1. A service never imports another service (services talk gRPC; shared code lives in shared/).
2. shared/ never imports services/ or tools/.
3. The gateway never imports torch, transformers or megatron (directly or through shared/).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("converter", "trainer", "textgen", "evaluator", "gateway")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def main() -> int:
    problems = []
    for svc in SERVICES:
        for f in (ROOT / "services" / svc).rglob("*.py"):
            for mod in imports_of(f):
                parts = mod.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] != svc:
                    problems.append(f"{f.relative_to(ROOT)} imports {mod}: services talk gRPC, move shared code to shared/")
                if parts[0] == "tools":
                    problems.append(f"{f.relative_to(ROOT)} imports {mod}: services must not depend on tools/")
    for f in (ROOT / "shared").rglob("*.py"):
        for mod in imports_of(f):
            if mod.split(".")[0] in ("services", "tools"):
                problems.append(f"{f.relative_to(ROOT)} imports {mod}: shared/ is below services and tools")
    probe = ("import sys, services.gateway.app, services.gateway.__main__; "
             "bad = [m for m in ('torch', 'transformers', 'megatron') if m in sys.modules]; print(','.join(bad))")
    heavy = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    if heavy:
        problems.append(f"the gateway imports {heavy}; it must stay light (no torch)")
    for p in problems:
        print(p)
    print("import rules: ok" if not problems else f"import rules: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
