"""What a record becomes: pretraining documents, or SFT samples (input ids + prompt-masked labels).

The SFT encoding (Alpaca and ShareGPT records, chat template or Alpaca prompt, labels only on what the
assistant says) is ``llm.sft_records``, shared with the trainer's HF + DeepSpeed ranks; here it is
packed into fixed-length rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from llm.sft_records import IGNORE
from tools.preprocess.readers import InputError

HANDLERS = {
    "GeneralPretrainHandler": "pretrain",
    "pretrain": "pretrain",
    "": "pretrain",
    "AlpacaStyleInstructionHandler": "alpaca",
    "alpaca": "alpaca",
    "SharegptStyleInstructionHandler": "sharegpt",
    "sharegpt": "sharegpt",
}
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_sentences(text: str, keep_newlines: bool) -> list[str]:
    """Rule-based splitter (NLTK's punkt data cannot be downloaded offline)."""
    parts = _SENTENCE.split(text)
    return parts if keep_newlines else [p.replace("\n", " ") for p in parts]


def text_of(doc: dict[str, Any], key: str, where: str) -> str | list[str]:
    if key not in doc:
        raise InputError(
            where, f"missing key '{key}' (keys: {', '.join(sorted(doc)) or 'none'})", "missing_key"
        )
    value = doc[key]
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise InputError(where, f"'{key}' is {type(value).__name__}, expected a string", "type")


class Packer:
    """Greedy, order-preserving packing of samples into windows of exactly ``seq_length`` tokens.

    Streaming (bounded memory), unlike ModelLink's whole-dataset knapsack. Padding uses the pad (else
    EOS) id with label -100 and attention mask 0; with ``neat`` the mask holds the 1-based sample
    index inside the pack (ModelLink's --neat-pack).
    """

    def __init__(self, seq_length: int, pad_id: int, neat: bool) -> None:
        self.seq_length, self.pad_id, self.neat = seq_length, pad_id, neat
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.mask: list[int] = []
        self.samples = 0

    def add(self, ids: list[int], labels: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self.ids and len(self.ids) + len(ids) > self.seq_length:
            yield self.flush()
        self.samples += 1
        self.ids += ids
        self.labels += labels
        self.mask += [self.samples if self.neat else 1] * len(ids)

    def flush(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pad = self.seq_length - len(self.ids)
        out = (
            np.array(self.ids + [self.pad_id] * pad, dtype=np.int32),
            np.array(self.labels + [IGNORE] * pad, dtype=np.int32),
            np.array(self.mask + [0] * pad, dtype=np.int32),
        )
        self.ids, self.labels, self.mask, self.samples = [], [], [], 0
        return out
