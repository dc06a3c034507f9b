"""Megatron checkpoints (mcore torch_dist and the legacy mp_rank_XX layout): detection and reading.

Readers give random access to the canonical tensors (merged over TP, placed by global layer, vocab
padding removed), one tensor at a time:

- legacy: ``iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt`` loaded with ``weights_only=True`` and
  ``mmap=True`` (a pickle that is not plain weights is refused, and nothing is read until used);
- torch_dist: the DCP ``.metadata`` index (read with an allow-listed unpickler, ``safe_pickle``), then
  each chunk read straight from its ``.distcp`` byte range, so a layer is read without loading the others.

Checkpoints written by megastack carry ``megastack.json`` (architecture, HF config, layout) and a
``tokenizer/`` folder; others are described from their Megatron ``args``.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import torch

from llm.checkpoints import layout as L
from llm.models.base import ArchConfig, expert_prefix, megatron_names
from llm.models.registry import family
from shared.errors import InvalidArgument, NotFound

TRACKER = "latest_checkpointed_iteration.txt"
META_FILE = "megastack.json"
TOKENIZER_DIR = "tokenizer"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def legacy_rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron's ``mp_rank_TT[_PPP][_EEE]``: the pipeline rank when PP > 1, the expert rank when EP > 1."""
    return (
        f"mp_rank_{tp_rank:02d}"
        + (f"_{pp_rank:03d}" if pp > 1 else "")
        + (f"_{ep_rank:03d}" if ep > 1 else "")
    )


def iteration_dir(path: Path, iteration: int | None = None) -> Path | None:
    """The folder holding the newest checkpoint (iter_XXXXXXX or release), from the tracker file; with
    ``iteration``, that iteration's folder (None when it is not there)."""
    path = Path(path)
    if iteration is not None:
        d = path / f"iter_{iteration:07d}"
        return d if d.is_dir() else None
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if name and (path / name).is_dir():
            return path / name
    for name in ["release", *sorted((p.name for p in path.glob("iter_*")), reverse=True)]:
        if (path / name).is_dir():
            return path / name
    return None


def detect_megatron_format(path: Path) -> str | None:
    """``mcore`` (torch_dist) or ``legacy`` (mp_rank_XX) for a Megatron save folder or iteration, or None."""
    d = iteration_dir(path)
    if d is None:
        return None
    if (d / "metadata.json").is_file():
        return "mcore"
    if any(d.glob("mp_rank_*/model_optim_rng.pt")):
        return "legacy"
    return None


def load_weights_pickle(path: Path) -> dict[str, Any]:
    """torch.load a Megatron file safely: weights and plain containers only (argparse args allowed)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated file or a pickle that is not weights
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidArgument(
            f"{path}: not a loadable weights file ({reason[:300]})", field="load_dir"
        ) from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{path}: expected a dict, got {type(obj).__name__}", field="load_dir")
    return obj


_PAGE = 4096
_MADV_DONTNEED = 4


@cache
def _libc():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def release_pages(t: torch.Tensor) -> None:
    """Drop a file-mapped tensor's pages from this process (they stay in the page cache).

    Safe for clean file-backed pages: touching them again re-reads the same bytes. Keeps the RSS of
    a pass over mmapped checkpoint files at about one tensor instead of growing to the whole file.
    """
    storage = t.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    if size < _PAGE:
        return
    first = (start + _PAGE - 1) // _PAGE * _PAGE
    last = (start + size) // _PAGE * _PAGE
    if last > first:
        _libc().madvise(first, last - first, _MADV_DONTNEED)


def arch_from_args(args: Any, source: str) -> ArchConfig:
    """Describe a Megatron checkpoint that carries no megastack.json from its training args."""

    def a(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    if a("num_layers") is None or a("hidden_size") is None:
        raise InvalidArgument(
            f"{source}: no megastack.json and no usable Megatron args; cannot tell the architecture",
            field="load_dir",
        )
    learned = a("position_embedding_type", "learned_absolute") == "learned_absolute"
    qkv_bias = bool(a("add_qkv_bias", False)) or bool(a("add_bias_linear", not learned))
    experts = int(a("num_experts") or 0)
    shared = int(a("moe_shared_expert_intermediate_size") or 0)
    qk_norm = bool(a("qk_layernorm", False))
    if experts:  # the family whose layout the MoE arguments describe
        fam = "qwen2_moe" if shared else "qwen3_moe" if qk_norm else "mixtral"
    else:
        fam = "gpt2" if learned else "qwen3" if qk_norm else "qwen2" if a("add_qkv_bias", False) else "llama"
    heads = int(a("num_attention_heads"))
    return ArchConfig(
        family=fam,
        architecture=family(fam).hf_architectures[0],
        vocab_size=int(a("true_vocab_size") or a("padded_vocab_size")),
        hidden_size=int(a("hidden_size")),
        num_layers=int(a("num_layers")),
        num_attention_heads=heads,
        num_query_groups=int(a("num_query_groups") or heads) if a("group_query_attention", False) else heads,
        head_dim=int(a("kv_channels") or a("hidden_size") // heads),
        ffn_hidden_size=int(a("ffn_hidden_size") or 4 * a("hidden_size")),
        max_position_embeddings=int(a("max_position_embeddings", 2048)),
        normalization=a("normalization", "LayerNorm"),
        norm_eps=float(a("norm_epsilon", a("layernorm_epsilon", 1e-5))),
        activation="swiglu" if a("swiglu", False) else "gelu_tanh",
        position_embedding="learned_absolute" if learned else "rope",
        rope_theta=float(a("rotary_base", 10000)),
        qkv_bias=qkv_bias,
        linear_bias=bool(a("add_bias_linear", learned)),
        tie_word_embeddings=not a("untie_embeddings_and_output_weights", False),
        qk_layernorm=qk_norm,
        num_experts=experts,
        moe_topk=int(a("moe_router_topk") or 0) if experts else 0,
        moe_ffn_hidden_size=int(a("moe_ffn_hidden_size") or a("ffn_hidden_size") or 0) if experts else 0,
        moe_norm_topk=not a("moe_router_pre_softmax", False),
        shared_expert_ffn=shared,
        shared_expert_gate=bool(a("moe_shared_expert_gate", False) or a("moe_use_shared_expert_gate", False)),
    )


class _LegacySource:
    """mp_rank_XX[_YYY]/model_optim_rng.pt files of one iteration."""

    def __init__(self, iter_dir: Path) -> None:
        self.dir = iter_dir
        found: dict[tuple[int, ...], Path] = {}
        for d in iter_dir.glob("mp_rank_*"):
            m = _RANK_DIR.match(d.name)
            if m and (d / "model_optim_rng.pt").is_file():
                found[tuple(int(g) for g in m.groups() if g is not None)] = d / "model_optim_rng.pt"
        if not found:
            raise InvalidArgument(f"{iter_dir}: no mp_rank_*/model_optim_rng.pt files", field="load_dir")
        files = self._ranks(found)  # (tp, pp, ep) -> file
        self.tp, self.pp, self.ep = (max(k[i] for k in files) + 1 for i in range(3))
        missing = [
            (t, p, e)
            for t in range(self.tp)
            for p in range(self.pp)
            for e in range(self.ep)
            if (t, p, e) not in files
        ]
        if missing:
            t, p, e = missing[0]
            name = legacy_rank_dir(t, p, self.pp, e, self.ep)
            raise InvalidArgument(f"{iter_dir}: {name}/model_optim_rng.pt is missing", field="load_dir")
        self.files = files
        self._index: dict[str, tuple[int, int, str, str]] = {}
        counts = []
        for p in range(self.pp):
            sd = self._load(0, p)
            keys = sorted((k for k in sd if re.fullmatch(r"model\d*", k)), key=lambda k: int(k[5:] or 0))
            if not keys:
                raise InvalidArgument(f"{files[(0, p, 0)]}: no 'model' state dict inside", field="load_dir")
            stage = []
            for key in keys:
                layers = [
                    parsed[0] for n in sd[key] if (parsed := L.from_stored(n)) and parsed[0] is not None
                ]
                stage.append(max(layers) + 1 if layers else 0)
            counts.append((keys, stage))
        self.layout = L.PipelineLayout(tuple(tuple(c) for _, c in counts))
        firsts = {(p, v): first for p, v, first, _ in self.layout.chunks()}
        for p, (keys, _) in enumerate(counts):
            for e in range(self.ep):
                sd = self._load(0, p, e)
                entries = []
                for v, key in enumerate(keys):
                    for stored in sd[key]:
                        if (parsed := L.from_stored(stored)) is not None:
                            local, sub = parsed
                            layer = None if local is None else firsts[(p, v)] + local
                            entries.append((layer, sub, (p, e, key, stored)))
                # an EP rank numbers its experts from 0: rank e holds experts e*n .. e*n + n - 1
                n = len({x[0] for _, sub, _ in entries if (x := L.expert_of(sub))})
                for layer, sub, where in entries:
                    expert = L.expert_of(sub)
                    if expert is not None:
                        sub = f"{expert_prefix(e * n + expert[0])}{expert[1]}"
                    name = sub if layer is None else f"decoder.layers.{layer}.{sub}"
                    self._index.setdefault(name, where)

    def _ranks(self, found: dict[tuple[int, ...], Path]) -> dict[tuple[int, int, int], Path]:
        """(tp, pp, ep) of each folder. Megatron names a folder mp_rank_TT[_PPP][_EEE], the pipeline rank only
        when PP > 1 and the expert rank only when EP > 1, so mp_rank_00_001 is PP or EP by the saved args."""
        if all(len(k) < 3 for k in found):
            first = found[min(found)]
            args = load_weights_pickle(first).get("args")
            ep = int(getattr(args, "expert_model_parallel_size", 1) or 1)
            pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
            if ep > 1 and pp == 1:
                return {(k[0], 0, k[1] if len(k) > 1 else 0): f for k, f in found.items()}
        return {(k[0], k[1] if len(k) > 1 else 0, k[2] if len(k) > 2 else 0): f for k, f in found.items()}

    @cache  # noqa: B019 - one reader per conversion; files are mmapped
    def _load(self, tp: int, pp: int, ep: int = 0) -> dict[str, Any]:
        return load_weights_pickle(self.files[(tp, pp, ep)])

    def args(self) -> Any:
        return self._load(0, 0).get("args")

    def iteration(self) -> int:
        return int(self._load(0, 0).get("iteration", 0) or 0)

    def has(self, name: str) -> bool:
        return name in self._index

    def get(self, name: str, gated: bool) -> torch.Tensor:
        p, e, key, stored = self._index[name]
        parts = []
        for t in range(self.tp):
            sd = self._load(t, p, e)[key]
            if stored not in sd:
                raise InvalidArgument(
                    f"{self.files[(t, p, e)]}: tensor {stored} is missing", field="load_dir"
                )
            parts.append(sd[stored])
        merged = L.merge(name, parts, gated=gated)
        if merged.data_ptr() == parts[0].data_ptr():
            merged = merged.clone()  # own the bytes, so the mapped pages can be released
        for part in parts:
            release_pages(part)
        return merged


class _DistSource:
    """A torch_dist (DCP) checkpoint folder, read chunk by chunk from the .distcp byte ranges."""

    def __init__(self, iter_dir: Path) -> None:
        from llm.checkpoints.safe_pickle import read_dcp_metadata

        self.dir = iter_dir
        md = read_dcp_metadata(iter_dir)  # an allow-listed unpickler: reading never runs code
        self.sizes: dict[str, torch.Size] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.chunks: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], Any]]] = {}
        for fqn, meta in md.state_dict_metadata.items():
            if hasattr(meta, "size"):
                self.sizes[fqn] = meta.size
                self.dtypes[fqn] = meta.properties.dtype
        sizes_by_offset = {
            (fqn, tuple(c.offsets)): tuple(c.sizes)
            for fqn, meta in md.state_dict_metadata.items()
            for c in getattr(meta, "chunks", [])
        }
        for idx, info in md.storage_data.items():
            if idx.offset is None or idx.fqn not in self.sizes:
                continue
            off = tuple(idx.offset)
            self.chunks.setdefault(idx.fqn, []).append((off, sizes_by_offset[(idx.fqn, off)], info))

    def args(self) -> Any:
        common = self.dir / "common.pt"
        return load_weights_pickle(common).get("args") if common.is_file() else None

    def iteration(self) -> int:
        return 0

    def _key(self, name: str) -> tuple[str, tuple[int, ...]]:
        if name in self.sizes:
            return name, ()
        key, lead = L.dist_key(name)  # layers (and experts) stacked on leading axes
        if key not in self.sizes and key.endswith("mlp.linear_fc1.layer_norm_weight"):
            # a MoE layer saved under Transformer Engine's spec by Megatron itself: its pre-MLP norm's own key
            alias = key.replace("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
            if alias in self.sizes:
                return alias, lead
        return key, lead

    def has(self, name: str) -> bool:
        return self._key(name)[0] in self.sizes

    def _read(self, info: Any) -> torch.Tensor:
        with open(self.dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        if len(raw) != info.length:
            raise InvalidArgument(
                f"{self.dir / info.relative_path}: truncated (chunk at byte {info.offset})", field="load_dir"
            )
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)

    def get(self, name: str, gated: bool) -> torch.Tensor:
        key, lead = self._key(name)
        size = tuple(self.sizes[key])
        k = len(lead)
        out = torch.empty(size[k:], dtype=self.dtypes[key])
        covered = 0
        for offsets, sizes, info in self.chunks.get(key, []):
            if not all(o <= i < o + n for i, o, n in zip(lead, offsets, sizes)):
                continue
            data = self._read(info)
            if k:
                data = data[tuple(i - o for i, o in zip(lead, offsets))]
                offsets, sizes = offsets[k:], sizes[k:]
            region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            out[region] = data
            covered += data.numel()
        if covered != out.numel():
            raise InvalidArgument(
                f"{self.dir}: chunks of {key} cover {covered} of {out.numel()} values", field="load_dir"
            )
        return out


class MegatronCheckpoint:
    """Random access to the canonical tensors of a Megatron checkpoint (format "mcore" or "legacy")."""

    def __init__(self, path: Path | str, fmt: str, iteration: int | None = None) -> None:
        self.path = Path(path)
        self.format = fmt
        d = iteration_dir(self.path, iteration)
        if d is None and iteration is not None:
            have = sorted(int(p.name[5:]) for p in self.path.glob("iter_*") if p.name[5:].isdigit())
            raise NotFound(
                f"{self.path} has no checkpoint of iteration {iteration} (it has: "
                f"{', '.join(map(str, have)) or 'none'})",
                field="load_iteration",
            )
        if d is None:
            raise InvalidArgument(f"{self.path}: no iteration folder (iter_* or release)", field="load_dir")
        self.iter_dir = d
        self._src = _LegacySource(d) if fmt == "legacy" else _DistSource(d)
        meta_file = self.path / META_FILE
        self.meta: dict[str, Any] = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if self.meta:
            self.arch = ArchConfig.from_dict(self.meta["arch"])
        else:
            self.arch = arch_from_args(self._src.args(), str(self.path))
        self.family = family(self.arch.family)
        self.hf_config: dict[str, Any] = self.meta.get("hf_config") or self.family.hf_config_from_arch(
            self.arch
        )
        names = self.names()
        missing = [n for n in names if not self._src.has(n)]
        if missing:
            raise InvalidArgument(
                f"{self.path}: {len(missing)} tensors missing for {self.arch.architecture}, first: "
                f"{missing[0]}",
                field="load_dir",
            )

    def names(self) -> list[str]:
        """Canonical names: the globals, then layer by layer."""
        return megatron_names(self.arch, None) + [
            n for i in range(self.arch.num_layers) for n in megatron_names(self.arch, i)
        ]

    def get(self, name: str) -> torch.Tensor:
        """One canonical tensor, merged over TP/PP shards, with the vocabulary padding removed."""
        t = self._src.get(name, self.arch.gated)
        if name in L.VOCAB_TENSORS and t.shape[0] > self.arch.vocab_size:
            t = t[: self.arch.vocab_size]
        return t

    def canonical_tensors(self):
        """(name, tensor) for every canonical tensor."""
        for name in self.names():
            yield name, self.get(name)

    def tokenizer_dir(self) -> Path | None:
        """The save folder's tokenizer/ (written by megastack), or None."""
        d = self.path / TOKENIZER_DIR
        return d if d.is_dir() else None

    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in."""
        return self.get("decoder.final_layernorm.weight").dtype

    def parallel_layout(self) -> dict[str, Any]:
        """TP, PP and layers per stage of a legacy checkpoint (None for torch_dist, which is layout-free)."""
        if isinstance(self._src, _LegacySource):
            return {
                "tensor_parallel": self._src.tp,
                "pipeline_parallel": self._src.pp,
                "expert_parallel": self._src.ep,
                "layers": self._src.layout.counts,
            }
        return {"tensor_parallel": None, "pipeline_parallel": None, "expert_parallel": None}


def write_description(out: Path, meta: dict[str, Any], tokenizer_files: list[Path]) -> None:
    """``megastack.json`` and ``tokenizer/``: what makes a Megatron checkpoint folder self-describing
    (the converter turns it back into HF without the original folder). Both written atomically."""
    import shutil

    from shared.atomic import write_text_atomic

    write_text_atomic(out / META_FILE, json.dumps(meta, indent=2, default=str) + "\n")
    if tokenizer_files:
        tmp = out / f".tmp-{TOKENIZER_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in tokenizer_files:
            shutil.copy(f, tmp / f.name)
        shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
        tmp.rename(out / TOKENIZER_DIR)
