"""Reading torch_dist (DCP) metadata without executing code.

``torch.distributed.checkpoint.FileSystemReader.read_metadata()`` is a plain ``pickle.load`` of the
``.metadata`` file, and megatron-core's ``dist_checkpointing.load`` calls it: a checkpoint folder from
anywhere could run any code in the converter, trainer or textgen process. Here the same file is read by
an unpickler that resolves only the classes DCP metadata is made of (listed below, taken from the
``.metadata`` files megatron-core and our converter write). Every one of them is a plain constructor (a
dataclass, an enum, ``torch.Size``, a dtype or layout lookup), so nothing else can run while loading.
:func:`check_dcp_checkpoint` (and :func:`llm.mcore.model.load_distributed`, which reads the metadata the same
way) is the gate in front of megatron-core's loader.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from shared.errors import InvalidArgument

_DCP = "torch.distributed.checkpoint"
ALLOWED: dict[str, frozenset[str]] = {
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),
    f"{_DCP}.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    f"{_DCP}.filesystem": frozenset({"_StorageInfo"}),
    f"{_DCP}.planner": frozenset({"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"}),
    "collections": frozenset({"OrderedDict"}),
}
METADATA_FILE = ".metadata"


class UnsafePickle(pickle.UnpicklingError):
    """The pickle names something outside the allow-list."""


class AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``allowed`` (module -> names); anything else is
    :class:`UnsafePickle`."""

    def __init__(self, file, allowed: dict[str, frozenset[str]], what: str) -> None:
        super().__init__(file)
        self.allowed, self.what = allowed, what

    def find_class(self, module: str, name: str) -> Any:
        """The class, only when it is on the allow-list; UnsafePickle otherwise (nothing else can be
        constructed)."""
        if name in self.allowed.get(module, ()):
            return super().find_class(module, name)
        raise UnsafePickle(f"{module}.{name} is not a class {self.what} is made of")


class _MetadataUnpickler(AllowListUnpickler):
    """:data:`ALLOWED`, plus torch dtypes (``torch.float32`` and the like, looked up by name)."""

    def __init__(self, file) -> None:
        super().__init__(file, ALLOWED, "torch_dist metadata")

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return super().find_class(module, name)


def read_dcp_metadata(ckpt_dir: Path) -> Any:
    """The DCP ``Metadata`` of a torch_dist folder, read with the allow-list; InvalidArgument otherwise."""
    import torch.distributed.checkpoint  # noqa: F401 - the allowed classes live there

    path = Path(ckpt_dir) / METADATA_FILE
    try:
        with path.open("rb") as f:
            md = _MetadataUnpickler(f).load()
    except UnsafePickle as e:
        raise InvalidArgument(
            f"{path}: refused to load: {e} (a checkpoint that would run code when read)", field="load_dir"
        ) from None
    except Exception as e:  # noqa: BLE001 - missing, truncated or not a pickle
        raise InvalidArgument(
            f"{path}: unreadable torch_dist metadata ({type(e).__name__}: {e})", field="load_dir"
        ) from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata):
        raise InvalidArgument(f"{path}: not torch_dist metadata (a {type(md).__name__})", field="load_dir")
    return md


def _numpy_globals() -> list:
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct  # type: ignore[attr-defined]  # numpy 2's pickles name np._core
    return [
        reconstruct,
        np.ndarray,
        np.dtype,
        *(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")),
    ]


def check_byte_entries(ckpt_dir: Path, md: Any) -> None:
    """Every non-tensor entry of a torch_dist folder (``_extra_state`` objects, the RNG state, ...), which
    DCP's planner would ``torch.load(weights_only=False)``, must load with torch's weights-only unpickler
    (plus numpy's array reconstruction, which the RNG state needs)."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_keys = {k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for idx, info in md.storage_data.items():
        if idx.fqn not in byte_keys:
            continue
        path = (Path(ckpt_dir) / info.relative_path).resolve()
        if Path(ckpt_dir).resolve() not in path.parents:
            raise InvalidArgument(
                f"{ckpt_dir}: entry {idx.fqn} points outside the checkpoint folder", field="load_dir"
            )
        with path.open("rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - whatever it is, it is not plain data
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidArgument(
                f"{ckpt_dir}: refused to load entry {idx.fqn}: it is not plain data ({reason[:200]}) "
                "(a checkpoint that would run code when read)",
                field="load_dir",
            ) from None


def check_dcp_checkpoint(ckpt_dir: Path) -> Any:
    """Call before megatron-core's ``dist_checkpointing.load``: its unrestricted unpickling of ``.metadata``
    and of every byte entry then meets only what was checked here. Returns the metadata."""
    md = read_dcp_metadata(ckpt_dir)
    check_byte_entries(ckpt_dir, md)
    return md
