"""Writers of Megatron checkpoints from canonical tensors: torch_dist (streamed) and legacy mp_rank files.

torch_dist is written directly in PyTorch's DCP file format, the way megatron-core's
``dist_checkpointing.save`` lays it out for a GPTModel (layers stacked on a leading axis, one chunk per
layer, ``_extra_state`` objects, ``metadata.json`` and ``common.pt``), one tensor at a time, so memory
stays at one tensor whatever the model size. megatron-core's ``dist_checkpointing.load`` reads it at
any TP/PP (the tests load it at TP=1 and TP=2).
"""

from __future__ import annotations

import argparse
import io
import json
import uuid
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    MetadataIndex,
)

from llm.checkpoints import layout as L
from llm.checkpoints.megatron import TRACKER, write_description
from llm.models.base import ArchConfig

DATA_FILE = "__0_0.distcp"
DIST_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def _storage_info(relative_path: str, offset: int, length: int) -> Any:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    return _StorageInfo(relative_path=relative_path, offset=offset, length=length)


def _saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class TorchDistWriter:
    """Append canonical tensors (already padded and cast) to a torch_dist checkpoint folder."""

    def __init__(self, out_dir: Path, arch: ArchConfig) -> None:
        # Imported here: torch.distributed.checkpoint takes half a second to import.
        from torch.distributed.checkpoint import metadata as dcp

        self.dcp = dcp
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.arch = arch
        self._f = open(self.dir / DATA_FILE, "wb")
        self._meta: dict[str, Any] = {}
        self._storage: dict[MetadataIndex, Any] = {}
        self.bytes_written = 0

    def _append(self, blob: bytes) -> tuple[int, int]:
        offset = self._f.tell()
        self._f.write(blob)
        return offset, len(blob)

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # torch.save writes the whole storage: save only this tensor's bytes
        key, lead = L.dist_key(name)
        stacked = (self.arch.num_layers, self.arch.num_experts)[: len(lead)]  # layers, then experts
        offsets, size = (*lead, *(0,) * t.dim()), (*stacked, *t.shape)
        chunk = t.reshape(*(1,) * len(lead), *t.shape)
        offset = self._f.tell()
        torch.save(chunk, self._f)  # straight into the data file, as DCP's own writer does
        length = self._f.tell() - offset
        dcp = self.dcp
        meta = self._meta.setdefault(
            key, dcp.TensorStorageMetadata(dcp.TensorProperties(dtype=t.dtype), torch.Size(size), [])
        )
        meta.chunks.append(
            dcp.ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(chunk.shape))
        )
        self._storage[dcp.MetadataIndex(key, torch.Size(offsets))] = _storage_info(DATA_FILE, offset, length)
        self.bytes_written += length

    def _extra_states(self) -> None:
        # megatron-core's local-spec linears carry an (empty) _extra_state, saved as a ShardedObject per layer
        # (per layer and expert for the experts: shard_<layer>.<expert>_<layers>.<experts>), which
        # dist_checkpointing.load asks for.
        blob = _saved([None])
        stacked = (self.arch.num_layers, self.arch.num_experts)
        for module in L.linear_modules(self.arch):
            for i in range(self.arch.num_layers):
                key, lead = L.dist_key(f"decoder.layers.{i}.{module}._extra_state")
                where = ".".join(map(str, lead)) + "_" + ".".join(map(str, stacked[: len(lead)]))
                key = f"{key}/shard_{where}"
                offset, length = self._append(blob)
                self._meta[key] = self.dcp.BytesStorageMetadata()
                self._storage[self.dcp.MetadataIndex(key)] = _storage_info(DATA_FILE, offset, length)

    def finish(self) -> None:
        import pickle

        self._extra_states()
        self._f.flush()
        self._f.close()
        md = self.dcp.Metadata(
            state_dict_metadata=self._meta,
            planner_data=None,
            storage_data=self._storage,
            storage_meta=self.dcp.StorageMeta(checkpoint_id=str(self.dir), save_id=str(uuid.uuid4())),
        )
        with open(self.dir / ".metadata", "wb") as f:
            pickle.dump(md, f)
        (self.dir / "metadata.json").write_text(json.dumps(DIST_METADATA))
        torch.save({}, self.dir / "common.pt")  # megatron-core's own model-only save leaves it empty

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()


def megatron_args(
    arch: ArchConfig,
    *,
    tp: int,
    pp: int,
    padded_vocab: int,
    divisible_by: int,
    dtype: torch.dtype,
    layout: L.PipelineLayout,
    iteration: int,
    ep: int = 1,
) -> argparse.Namespace:
    """The training args Megatron stores in legacy checkpoints (and reads back with check_checkpoint_args)."""
    return argparse.Namespace(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        group_query_attention=arch.num_query_groups != arch.num_attention_heads,
        kv_channels=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        padded_vocab_size=padded_vocab,
        true_vocab_size=arch.vocab_size,
        make_vocab_size_divisible_by=divisible_by,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_layer_list=",".join(str(sum(c)) for c in layout.counts),
        normalization=arch.normalization,
        norm_epsilon=arch.norm_eps,
        swiglu=arch.gated,
        add_bias_linear=arch.linear_bias,
        add_qkv_bias=arch.qkv_bias,
        untie_embeddings_and_output_weights=not arch.tie_word_embeddings,
        position_embedding_type=arch.position_embedding,
        rotary_base=arch.rope_theta,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        qk_layernorm=arch.qk_layernorm,
        expert_model_parallel_size=ep,
        num_experts=arch.num_experts or None,
        moe_router_topk=arch.moe_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size or None,
        moe_router_pre_softmax=arch.moe and not arch.moe_norm_topk,
        moe_shared_expert_intermediate_size=arch.shared_expert_ffn or None,
        moe_shared_expert_gate=arch.shared_expert_gate,
        tokenizer_type="HuggingFaceTokenizer",
        iteration=iteration,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )


def write_megatron_extras(
    out: Path, *, iteration: int, meta: dict[str, Any], tokenizer_files: list[Path]
) -> None:
    """Tracker file, megastack.json and the tokenizer: what makes the folder self-describing."""
    (out / TRACKER).write_text(str(iteration) if iteration else "release")
    write_description(out, meta, tokenizer_files)
