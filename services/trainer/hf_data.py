"""The data of an ``hf-deepspeed`` job: instruction records tokenized once per rank, a deterministic order.

Every rank reads the same records (``llm.sft_records``: Alpaca or ShareGPT, the model's chat template,
prompt tokens labelled -100) and truncates them to ``seq_length``. The order is a permutation of the
samples drawn from ``seed + epoch``; global step ``s`` takes the next ``global_batch_size`` samples of
its epoch, rank ``r`` the ``r``-th contiguous share of them, split into micro-batches. Nothing else
is state: a resumed job at step ``s`` reads exactly what an uninterrupted one reads, and plain DDP fed
by the same :class:`Samples` sees the same batches (the ZeRO-vs-DDP tests rely on it). The last
partial global batch of an epoch is dropped, so every rank runs the same number of micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.sft_records import IGNORE, RecordEncoder, read_records


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    return num_samples // global_batch_size


def total_steps(train_iters: int, epochs: int, num_samples: int, global_batch_size: int) -> int:
    """The job's optimizer steps: ``train_iters``, or ``epochs`` passes over the samples."""
    return train_iters if train_iters else epochs * steps_per_epoch(num_samples, global_batch_size)


@dataclass
class Samples:
    ids: list[list[int]]
    labels: list[list[int]]
    pad_id: int

    @classmethod
    def from_files(cls, files, tok, seq_length: int) -> Samples:
        enc = RecordEncoder(tok)
        ids, labels = [], []
        for f in files:
            for where, doc in read_records(Path(f)):
                i, lab = enc.encode(doc, where)
                ids.append(i[:seq_length])
                labels.append(lab[:seq_length])
        pad = tok.pad_id if tok.pad_id is not None else tok.eod_id
        return cls(ids, labels, int(pad))

    def unanswered(self) -> int:
        """Samples with no labelled token left once cut to the sequence length (they train nothing)."""
        return sum(all(t == IGNORE for t in lab[1:]) for lab in self.labels)

    def __len__(self) -> int:
        return len(self.ids)

    def order(self, seed: int, epoch: int) -> list[int]:
        g = torch.Generator(device="cpu").manual_seed(seed + epoch)
        return torch.randperm(len(self), generator=g, device="cpu").tolist()

    def micro_batches(
        self, step: int, *, seed: int, global_batch_size: int, micro_batch_size: int, rank: int, world: int
    ) -> list[dict[str, torch.Tensor]]:
        """The micro-batches rank ``rank`` trains on at 0-based global step ``step``."""
        spe = steps_per_epoch(len(self), global_batch_size)
        epoch, within = divmod(step, spe)
        picked = self.order(seed, epoch)[within * global_batch_size : (within + 1) * global_batch_size]
        share = global_batch_size // world
        mine = picked[rank * share : (rank + 1) * share]
        return [self.collate(mine[i : i + micro_batch_size]) for i in range(0, share, micro_batch_size)]

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """Right-padded to the longest sample of the micro-batch; padding is masked and unlabelled."""
        width = max(len(self.ids[i]) for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long, device="cpu")
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(idx), width), dtype=torch.long, device="cpu")
        for row, i in enumerate(idx):
            n = len(self.ids[i])
            ids[row, :n] = torch.tensor(self.ids[i], dtype=torch.long, device="cpu")
            labels[row, :n] = torch.tensor(self.labels[i], dtype=torch.long, device="cpu")
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions (the answer tokens) of a micro-batch:
    position ``t`` predicts label ``t + 1``; a micro-batch with no labelled token gives 0."""
    pred = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(pred, target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


def lr_factor(step: int, *, warmup: int, decay_steps: int, style: str, min_ratio: float) -> float:
    """Megatron's schedule as a multiplier of the peak LR at 0-based ``step``: linear warm-up from 0 over
    ``warmup`` steps, then cosine, linear or constant decay to ``min_ratio`` by ``decay_steps``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if style == "constant" or decay_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (decay_steps - warmup))
    shape = 0.5 * (math.cos(math.pi * progress) + 1.0) if style == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape
