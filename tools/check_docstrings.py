"""Docstring rule (run by `make lint`): every public function and method of a module that another folder
imports (another service, or across shared/, llm/, services/ and tools/) says what it does. Tests do not count
as importers; names starting with an underscore and dunder methods are exempt."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_imports import ROOT, module_graph  # noqa: E402


def folder(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "services" else parts[0]


def imported_across() -> set[str]:
    return {e for m, edges in module_graph().items() for e in edges if folder(e) != folder(m)}


def undocumented(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def check(node: ast.AST, owner: str = "") -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner}{node.name}")

    for node in tree.body:
        check(node)
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                check(item, f"{node.name}.")
    return out


def main() -> int:
    problems = []
    for module in sorted(imported_across()):
        path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        if not path.is_file():
            path = ROOT.joinpath(*module.split("."), "__init__.py")
        if path.is_file():
            problems += undocumented(path)
    for p in problems:
        print(f"{p}: no docstring (public, and imported from another folder)")
    print("docstrings: ok" if not problems else f"docstrings: {len(problems)} missing")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
