"""Training data for a rank: Megatron's GPTDataset (blends, train/valid/test split) or SFT samples.

Batches come from a sampler that starts at ``consumed_samples`` (so a resumed job continues with the
next unseen sample) and gives each data-parallel rank its own slice of every global batch. Every rank
reads its own batches; tensor-parallel peers read identical ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llm.mcore.packing import segment_positions
from services.trainer.datafiles import split_documents
from services.trainer.spec import TrainSpec

IGNORE = -100
logger = logging.getLogger(__name__)


class ResumableSampler:
    """Megatron's MegatronPretrainingSampler: sequential, starts at consumed_samples, sliced per DP rank."""

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
        self.total, self.consumed = total, consumed
        self.mbs, self.rank, self.size = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.size
        start = self.consumed
        while start + step <= self.total:
            yield list(range(start + self.rank * self.mbs, start + (self.rank + 1) * self.mbs))
            start += step


class SFTOrder:
    """(dataset, sample) of draw ``n``, for ``total`` draws: blended by ``weights`` with megatron-core's rule
    (its C++ ``build_blending_indices``: each draw goes to the dataset furthest behind its share), each
    dataset's samples in a seeded shuffle drawn afresh every epoch, from the ``part`` (0 train, 1 valid, 2
    test) of each dataset that ``split`` cuts as megatron-core cuts documents (None: the whole dataset).
    Deterministic, so a resumed job continues the same order; nothing per draw is materialised for a single
    dataset."""

    def __init__(
        self,
        sizes: list[int],
        weights: list[float],
        total: int,
        seed: int,
        *,
        split: str | None = None,
        part: int = 0,
    ) -> None:
        self.total, self.seed, self.part = total, seed, part
        self.ranges = []
        for n in sizes:
            counts = split_documents(split, n) if split is not None else [n, 0, 0]
            start = sum(counts[:part])
            self.ranges.append((start, start + counts[part]))
        self.dataset_index = self.sample_index = None
        if len(sizes) > 1:
            from megatron.core.datasets import helpers

            w = np.asarray(weights, dtype=np.float64)
            self.dataset_index = np.zeros(total, dtype=np.int16)
            self.sample_index = np.zeros(total, dtype=np.int64)
            helpers.build_blending_indices(
                self.dataset_index, self.sample_index, w / w.sum(), len(sizes), total, False
            )
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, n: int) -> tuple[int, int]:
        d, k = (
            (0, n) if self.dataset_index is None else (int(self.dataset_index[n]), int(self.sample_index[n]))
        )
        a, b = self.ranges[d]
        epoch, pos = divmod(k, b - a)
        perm = self._perms.get((d, epoch))
        if perm is None:
            if len(self._perms) >= 8:
                self._perms.pop(next(iter(self._perms)))
            perm = self._perms[(d, epoch)] = np.random.default_rng(
                [self.seed, d, epoch, self.part]
            ).permutation(b - a)
        return d, a + int(perm[pos])


class SFTDataset(Dataset):
    """``{prefix}_packed_{input_ids,labels}_document`` samples (from `megastack preprocess`), causal-LM ready,
    in the order :class:`SFTOrder` gives (blend weights, seeded shuffle, the split's part)."""

    def __init__(
        self,
        prefixes: list[str],
        seq_length: int,
        pad_id: int,
        *,
        weights: list[float] | None = None,
        total: int | None = None,
        seed: int = 1234,
        split: str | None = None,
        part: int = 0,
    ) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.triples = [
            (
                IndexedDataset(f"{p}_packed_input_ids_document"),
                IndexedDataset(f"{p}_packed_labels_document"),
                IndexedDataset(f"{p}_packed_attention_mask_document"),
            )
            for p in prefixes
        ]
        sizes = [len(ids) for ids, _, _ in self.triples]
        total = (
            total
            if total is not None
            else sum(split_documents(split, n)[part] if split else n for n in sizes)
        )
        self.index = SFTOrder(sizes, weights or [1.0] * len(sizes), total, seed, split=split, part=part)
        self.seq_length, self.pad_id = seq_length, pad_id

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """Tokens, next-token labels and loss mask, and the pack layout: ``segment_ids`` (which sample each
        token is, ModelLink's attention-mask values; 0 = padding) and ``position_ids`` restarting at each
        sample."""
        d, i = self.index[idx % len(self.index)]
        ids_ds, labels_ds, mask_ds = self.triples[d]
        s = self.seq_length
        ids = np.asarray(ids_ds[i], dtype=np.int64)[:s]
        labels = np.asarray(labels_ds[i], dtype=np.int64)[:s]
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        tokens[: len(ids)] = ids
        segments = np.zeros(s, dtype=np.int64)
        raw = np.asarray(mask_ds[i], dtype=np.int64)[: len(ids)]
        segments[: len(raw)] = raw
        # next-token targets: position t predicts labels[t + 1], within its own sample only (the last token
        # of a sample in a pack must not learn the first token of the next); masked positions carry IGNORE
        target = np.full(s, IGNORE, dtype=np.int64)
        target[: max(0, len(labels) - 1)] = labels[1:]
        target[:-1][segments[:-1] != segments[1:]] = IGNORE
        mask = target != IGNORE
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(np.where(mask, target, 0)),
            "loss_mask": torch.from_numpy(mask.astype(np.float32)),
            "position_ids": torch.from_numpy(segment_positions(segments)),
            "segment_ids": torch.from_numpy(segments),
        }


class DatasetTokenizer:
    """What megatron-core's GPTDataset asks of a tokenizer (vocabulary size, EOD and pad ids), from any
    tokenizer folder megastack reads: HF ``tokenizer.json`` or GPT-2 BPE ``vocab.json`` + ``merges.txt``."""

    def __init__(self, tokenizer_dir: Path) -> None:
        from llm.tokenizers import FastTokenizer

        tok = FastTokenizer.from_dir(tokenizer_dir)
        self.vocab_size = tok.vocab_size
        self.eod = self.eos = tok.eod_id
        self._pad = tok.pad_id
        # part of GPTDataset's cache key (its index files are reused only for the same tokenizer)
        self.unique_identifiers = {
            "class": "DatasetTokenizer",
            "path": str(Path(tokenizer_dir).resolve()),
            "vocab_size": self.vocab_size,
            "eod": self.eod,
        }

    @property
    def pad(self) -> int:
        if self._pad is None:
            raise AttributeError("no pad token")  # GPTDataset then uses its own out-of-vocabulary pad id
        return self._pad


def _gpt_datasets(spec: TrainSpec, tokenizer_dir: Path, samples: list[int]):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes = [p for p, _ in spec.data_paths]
    weights = [w for _, w in spec.data_paths]
    cache = spec.data_cache_dir or str(Path(spec.save_dir) / "data-cache")
    config = GPTDatasetConfig(
        random_seed=spec.seed,
        sequence_length=spec.seq_length,
        blend=(prefixes, weights),
        split=spec.split,
        path_to_cache=cache,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        tokenizer=DatasetTokenizer(tokenizer_dir),
    )
    # Splits nobody reads are not built: megatron-core would loop forever drawing samples from a split with
    # no documents (a tiny test split). The train/valid bounds stay those of ``split``.
    config.split_matrix = [m if n else None for m, n in zip(config.split_matrix, samples)]
    return BlendedMegatronDatasetBuilder(GPTDataset, samples, lambda: True, config).build()


def build_datasets(spec: TrainSpec, tokenizer_dir: Path, pad_id: int):
    """(train, valid) datasets; valid is None without evaluation."""
    train_samples = spec.train_iters * spec.global_batch_size
    evals = (
        (spec.train_iters // spec.eval_interval + 1) * spec.eval_iters * spec.global_batch_size
        if spec.eval_interval
        else 0
    )
    if spec.kind == "sft":
        prefixes, weights = [p for p, _ in spec.data_paths], [w for _, w in spec.data_paths]
        held_out = not spec.valid_data_paths
        train = SFTDataset(
            prefixes,
            spec.seq_length,
            pad_id,
            weights=weights,
            total=train_samples,
            seed=spec.seed,
            split=spec.split if held_out else None,
            part=0,
        )
        if not evals:
            return train, None
        if held_out:
            valid = SFTDataset(
                prefixes,
                spec.seq_length,
                pad_id,
                weights=weights,
                total=evals,
                seed=spec.seed,
                split=spec.split,
                part=1,
            )
            logger.info("SFT validation: part 2 of data.split %s of data.paths, never trained on", spec.split)
        else:
            valid = SFTDataset(
                [p for p, _ in spec.valid_data_paths],
                spec.seq_length,
                pad_id,
                weights=[w for _, w in spec.valid_data_paths],
                total=evals,
                seed=spec.seed,
            )
            logger.info("SFT validation: data.valid_paths (%d datasets)", len(spec.valid_data_paths))
        return train, valid
    train, valid, _ = _gpt_datasets(spec, tokenizer_dir, [train_samples, evals, 0])
    return train, valid


def _collate(items: list[dict]) -> dict[str, torch.Tensor]:
    keys = ("tokens", "labels", "loss_mask", "position_ids") + (
        ("segment_ids",) if "segment_ids" in items[0] else ()
    )
    batch = {k: torch.stack([torch.as_tensor(x[k]) for x in items]) for k in keys}
    batch["tokens"] = batch["tokens"].long()
    batch["labels"] = batch["labels"].long()
    return batch


def batches(
    ds, *, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int, total: int | None = None
) -> Iterator[dict]:
    sampler = ResumableSampler(total or len(ds), consumed, micro_batch_size, dp_rank, dp_size)
    return iter(DataLoader(ds, batch_sampler=sampler, collate_fn=_collate, num_workers=0))
