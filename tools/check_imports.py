"""Import rules (run by `make lint`):

1. A service never imports another service (services talk gRPC; shared code lives in shared/ or llm/).
2. shared/ (infrastructure) never imports llm/, services/ or tools/, nor torch, transformers or megatron;
   llm/ (the domain library) never imports services/ or tools/.
3. The gateway never imports torch, transformers or megatron, nor llm/ (directly or through shared/).
4. No import cycles among the modules of services/, shared/, llm/ and tools/ (lazy imports inside functions
   count; ``if TYPE_CHECKING:`` blocks do not): a cycle means two modules that cannot be read, or moved, one
   without the other.
5. The trainer service's head (servicer, launcher, wire) loads no rank-side code: no torch, megatron-core or
   Ray placement code; what jobs write and the head reads is in services/trainer/jobfiles.py.
6. tools/ reaches a service only through its public module ``services/<svc>/api.py`` (lazy re-exports).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("converter", "trainer", "textgen", "evaluator", "gateway")


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    skip = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
        ):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(path: Path, *, with_names: bool = False) -> set[str]:
    """Modules ``path`` imports anywhere (functions included); with ``with_names`` also ``pkg.name`` for every
    ``from pkg import name`` (the name may be a submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if with_names:
                out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def module_graph() -> dict[str, set[str]]:
    """Module -> the modules of this repository it imports (a ``from pkg import sub`` edge goes to the
    submodule)."""
    files = {}
    for base in ("services", "shared", "llm", "tools"):
        for f in (ROOT / base).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for mod, f in files.items():
        edges = set()
        for imp in imports_of(f, with_names=True):
            if imp in files and imp != mod:
                edges.add(imp)
        # "from pkg import sub": the submodule edge stands for the package's
        edges -= {e for e in edges if any(x.startswith(e + ".") for x in edges)}
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    group = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        group.append(w)
                        if w == v:
                            break
                    if len(group) > 1:
                        out.append(sorted(group))
    return out


def main() -> int:
    problems = []
    for svc in SERVICES:
        for f in (ROOT / "services" / svc).rglob("*.py"):
            for mod in imports_of(f):
                parts = mod.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] != svc:
                    problems.append(
                        f"{f.relative_to(ROOT)} imports {mod}: services talk gRPC, move shared code to "
                        "shared/"
                    )
                if parts[0] == "tools":
                    problems.append(
                        f"{f.relative_to(ROOT)} imports {mod}: services must not depend on tools/"
                    )
    for f in (ROOT / "shared").rglob("*.py"):
        for mod in imports_of(f):
            top = mod.split(".")[0]
            if top in ("services", "tools", "llm"):
                problems.append(
                    f"{f.relative_to(ROOT)} imports {mod}: shared/ is infrastructure, below llm/, services "
                    "and tools"
                )
            if top in ("torch", "transformers", "megatron"):
                problems.append(
                    f"{f.relative_to(ROOT)} imports {mod}: shared/ is infrastructure; ML code belongs in llm/"
                )
    for f in (ROOT / "llm").rglob("*.py"):
        for mod in imports_of(f):
            if mod.split(".")[0] in ("services", "tools"):
                problems.append(f"{f.relative_to(ROOT)} imports {mod}: llm/ is below services and tools")
    for f in (ROOT / "services" / "gateway").rglob("*.py"):
        for mod in imports_of(f):
            if mod.split(".")[0] in ("llm", "torch", "transformers", "megatron"):
                problems.append(f"{f.relative_to(ROOT)} imports {mod}: the gateway stays light (no ML code)")
    probe = (
        "import sys, services.gateway.app, services.gateway.__main__; "
        "bad = [m for m in ('torch', 'transformers', 'megatron', 'llm') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    heavy = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    if heavy:
        problems.append(f"the gateway imports {heavy}; it must stay light (no torch)")
    for f in (ROOT / "tools").rglob("*.py"):
        for mod in imports_of(f):
            parts = mod.split(".")
            if parts[0] == "services" and len(parts) > 2 and parts[2] != "api":
                problems.append(f"{f.relative_to(ROOT)} imports {mod}: tools/ use services/{parts[1]}/api.py")
    for group in cycles(module_graph()):
        problems.append(f"import cycle: {' <-> '.join(group)}")
    probe = (
        "import sys, services.trainer.servicer, services.trainer.launcher, services.trainer.wire; "
        "bad = [m for m in ('torch', 'megatron', 'ray.util.placement_group', 'services.trainer.train', "
        "'services.trainer.ray_driver') if m in sys.modules]; print(','.join(bad))"
    )
    heavy = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    if heavy:
        problems.append(
            f"the trainer's head imports {heavy}; it reads jobs through services/trainer/jobfiles.py"
        )
    for p in problems:
        print(p)
    print("import rules: ok" if not problems else f"import rules: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
