"""What the importers of ``megastack train import-args`` share: the result (:class:`Imported`) and the checks
of single values, each naming the flag or positional argument it read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import InvalidArgument


@dataclass
class Imported:
    source: str  # which layout was read
    doc: dict[str, Any]  # TrainJobSpec document (YAML sections)
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (item, where it went)
    no_effect: list[tuple[str, str]] = field(default_factory=list)  # (item, why)
    unmapped: list[tuple[str, str]] = field(default_factory=list)  # (item, why not)
    hf_config: dict[str, Any] | None = None  # architecture to write next to the spec (training from scratch)

    def set(self, path: str, value: Any, item: str, note: str = "") -> None:
        section, _, key = path.rpartition(".")
        target = self.doc
        for part in section.split(".") if section else []:
            target = target.setdefault(part, {})
        target[key] = value
        self.mapped.append((item, f"{path}: {value}" + (f" {note}" if note else "")))


def bad(message: str) -> InvalidArgument:
    """A 400 for the imported command line (field ``args``)."""
    return InvalidArgument(message, field="args")


def one(flag: str, values: list[str], kind=str):
    """The single value of ``--flag`` as ``kind``; 400 for none, several or one that does not parse."""
    if len(values) != 1:
        raise bad(f"--{flag} needs exactly one value, got {len(values)}: {' '.join(values) or '(none)'}")
    try:
        return kind(values[0])
    except ValueError:
        raise bad(f"--{flag} {values[0]!r} is not a valid {kind.__name__}") from None


def flag_bool(name: str, v: str) -> bool:
    """A positional ``true``/``false``."""
    if v not in ("true", "false"):
        raise bad(f"{name} must be true or false, got {v!r}")
    return v == "true"


def flag_num(name: str, v: str, kind=int):
    """A positional number as ``kind``."""
    try:
        return kind(v)
    except ValueError:
        raise bad(f"{name} must be a {kind.__name__}, got {v!r}") from None


def te_where() -> str:
    """What a job with ``transformer_impl: auto`` will do, said for the training nodes and for this
    machine."""
    import importlib.util

    here = "importable" if importlib.util.find_spec("transformer_engine") else "not installed"
    return (
        "(training nodes: Transformer Engine spec where transformer_engine imports with CUDA, else "
        "megatron-core's "
        f"local spec with unfused attention, said in the job log; on this machine TE is {here})"
    )


def tokenizer_vocab(path: str | None) -> int:
    """The vocabulary size of the HF tokenizer folder at ``path``; 0 when there is none."""
    if not path or not Path(path).exists():
        return 0
    from llm.tokenizers import FastTokenizer

    return FastTokenizer.from_dir(path).vocab_size
