"""Each request rule stated once (run by `make lint`), where a checker can see it:

1. Only services/gateway/fields.py turns request values into textgen's sampling message or names finish
   reasons: no other gateway module calls ``SamplingParams(...)`` with anything but ``greedy=True`` (the
   readiness probe), nor reads a ``FINISH_REASON_*`` value, ``MIN_TEMPERATURE`` or ``MIN_TOP_P``.
2. The numeric limits of the wire live in shared/limits.py: no other module assigns ``INT32_MAX``,
   ``INT64_MAX``, ``MIN_TEMPERATURE``, ``MIN_TOP_P``, ``MAX_TOP_LOGPROBS`` or ``MAX_STOP_SEQUENCES``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "services" / "gateway"
RULES_HOME = GATEWAY / "fields.py"
LIMITS_HOME = ROOT / "shared" / "limits.py"
SHARED_RULES = {"MIN_TEMPERATURE", "MIN_TOP_P"}
LIMITS = {"INT32_MAX", "INT64_MAX", "MIN_TEMPERATURE", "MIN_TOP_P", "MAX_TOP_LOGPROBS", "MAX_STOP_SEQUENCES"}


def _name(node: ast.AST) -> str:
    return getattr(node, "attr", getattr(node, "id", ""))


def gateway_problems(path: Path, tree: ast.AST) -> list[str]:
    """Rule 1 for one gateway module."""
    out = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call) and _name(node.func) == "SamplingParams":
            greedy_probe = not node.args and [
                (k.arg, getattr(k.value, "value", None)) for k in node.keywords
            ] == [("greedy", True)]
            if not greedy_probe:
                out.append(f"{where}: builds SamplingParams itself (use fields.sampling_params)")
        elif isinstance(node, (ast.Name, ast.Attribute)):
            name = _name(node)
            if name.startswith("FINISH_REASON_") or name in SHARED_RULES:
                out.append(f"{where}: uses {name} (the rule is fields.py's: finish_name, sampling_is_greedy)")
    return out


def limit_problems(path: Path, tree: ast.AST) -> list[str]:
    """Rule 2 for one module."""
    out = []
    for node in ast.walk(tree):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        for t in targets:
            if isinstance(t, ast.Name) and t.id in LIMITS:
                out.append(
                    f"{path.relative_to(ROOT)}:{node.lineno}: defines {t.id} (shared/limits.py has it)"
                )
    return out


def main() -> int:
    problems = []
    for folder in ("shared", "llm", "services", "tools"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            if path.parent == GATEWAY and path != RULES_HOME:
                problems += gateway_problems(path, tree)
            if path != LIMITS_HOME:
                problems += limit_problems(path, tree)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    print("request rules: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
