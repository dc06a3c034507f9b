"""Lazy re-exports for a package's public module (PEP 562): names resolve on first use, so importing the
public surface costs nothing until a name is used (a CLI command that submits a job need not load torch)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    module_name: str, names: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """(``__getattr__``, ``__dir__``, ``__all__``) for ``module_name`` exporting ``names`` (name -> defining
    module)."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(
                f"module {module_name!r} has no attribute {name!r} (public names: {', '.join(sorted(names))})"
            )
        return getattr(importlib.import_module(names[name]), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__, sorted(names)
