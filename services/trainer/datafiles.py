"""What submit-time validation reads of a job's datasets, without torch: split sizes and the pack layout."""

from __future__ import annotations

import numpy as np

from llm.indexed_dataset import IndexedDatasetReader


def neat_packed(prefixes: list[str]) -> bool:
    """Whether SFT data holds neat packs (several samples per row, to be kept apart), judged from the first
    rows of each dataset's attention-mask file (`megastack preprocess --neat-pack` writes every row that
    way)."""
    for p in prefixes:
        masks = IndexedDatasetReader(f"{p}_packed_attention_mask_document")
        if any(int(np.max(masks[i], initial=0)) > 1 for i in range(min(16, len(masks)))):
            return True
    return False


def split_documents(split: str, num_documents: int) -> list[int]:
    """Documents per train/valid/test split, as megatron-core's builder cuts them (rounded cumulative
    bounds)."""
    weights = [float(x) for x in split.split(",")]
    total = sum(weights)
    cum = [sum(weights[:i]) / total for i in range(len(weights) + 1)]
    bounds = [int(round(c * float(num_documents))) for c in cum]
    return [b - a for a, b in zip(bounds, bounds[1:])]
