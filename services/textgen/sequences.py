"""What callers of the engine see: a sequence's request, its events and result, and the handle to follow
or cancel it. The engine loop that produces them is ``services.textgen.engine``."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch-free at run time: the scheduler imports this module
    from services.textgen.engine import Engine
    from services.textgen.sampling import SamplingSpec


class Finish(StrEnum):
    """Why a sequence ended (the values are the metrics' ``finished_reason`` labels)."""

    LENGTH = "length"  # max_new_tokens or the context
    EOS = "eos"  # the end-of-sequence token
    STOP_SEQUENCE = "stop_sequence"  # a stop string
    EOL = "eol"  # Megatron's stop_on_eol / stop_on_double_eol
    CANCELLED = "cancelled"  # the caller left or cancelled
    ERROR = "error"  # a fault contained to this sequence


LENGTH, EOS, STOP_SEQUENCE, EOL, CANCELLED, ERROR = Finish


@dataclass(frozen=True)
class StopSpec:
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings cannot end the sequence before this many
    stop_token_ids: tuple[int, ...] = ()  # end the sequence like EOS


@dataclass(frozen=True)
class SequenceRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingSpec
    stopping: StopSpec
    prompt_logprobs: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs_from: int = 0  # score prompt positions max(1, this)..n-1
    guide_index: Any = None  # a compiled structured-output constraint (services.textgen.guided), or None

    @property
    def scored_from(self) -> int:
        return max(1, self.prompt_logprobs_from)


@dataclass(frozen=True)
class TopK:
    ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float | None
    top: TopK | None


@dataclass
class SequenceResult:
    prompt_ids: list[int]
    token_ids: list[int]
    prompt_logprobs: list[float] | None
    prompt_top: list[TopK] | None
    logprobs: list[float] | None
    top: list[TopK] | None
    finish_reason: Finish
    stop_sequence: str = ""
    queue_s: float = 0.0
    first_token_s: float = 0.0
    total_s: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class TokenizerInfo:
    """What the engine needs from the tokenizer: special ids and a decoder for stop strings."""

    eos_id: int | None
    newline_id: int | None
    double_newline_id: int | None
    colon_id: int | None
    vocab_size: int
    decode: Callable[[list[int]], str]
    # every id that ends a sequence like EOS: the tokenizer's, and the model's lists (Llama 3 Instruct's
    # generation_config.json: <|end_of_text|>, <|eom_id|>, <|eot_id|>)
    eos_ids: tuple[int, ...] = ()

    @cached_property
    def ends(self) -> tuple[int, ...]:
        """The end-of-sequence ids (``eos_id`` and ``eos_ids``), worked out once: read for every token."""
        return tuple(dict.fromkeys([*([self.eos_id] if self.eos_id is not None else []), *self.eos_ids]))


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int
    max_queue_size: int
    max_prefill_tokens: int
    batch_invariant: str = "scoring"  # off | scoring | all: which sequences are computed alone (see Engine)
    prefix_caching: bool = True  # reuse cached full blocks of a prompt's prefix (see blocks.BlockPool)
    prefill_chunk_tokens: int = 16  # a prompt's tokens prefilled per step while others decode (scheduler)
    prefill_step_tokens: int = 512  # all prompts' tokens prefilled per step while others decode (scheduler)


BATCH_INVARIANT = ("off", "scoring", "all")


class SequenceHandle:
    """The caller's side of one sequence.

    Events go to the handle's own queue, or, when several handles share a ``sink``, to that queue as
    ``(index, event)`` pairs so one reader can follow all of them (streaming several prompts).
    """

    def __init__(self, engine: Engine, index: int, sink: queue.SimpleQueue | None = None) -> None:
        self._engine = engine
        self.index = index
        self._sink = sink
        self._events: queue.SimpleQueue = sink if sink is not None else queue.SimpleQueue()
        self.cancelled = False

    def _put(self, ev: TokenEvent | SequenceResult) -> None:
        self._events.put((self.index, ev) if self._sink is not None else ev)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._engine._wake()

    def events(self) -> Iterator[TokenEvent | SequenceResult]:
        """Token events as they are produced, then the SequenceResult (always last). Not with a sink."""
        assert self._sink is None, "read the shared sink instead"
        while True:
            ev = self._events.get()
            yield ev
            if isinstance(ev, SequenceResult):
                return

    def result(self) -> SequenceResult:
        for ev in self.events():
            if isinstance(ev, SequenceResult):
                return ev
        raise AssertionError("unreachable")
