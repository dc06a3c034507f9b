"""Which sequences run in the next engine step, and where their keys and values live. Torch-free.

The engine loop reads: ``admit`` (waiting -> prefill, within the budgets) -> forward passes ->
``commit`` (register the blocks just written in the prefix cache) -> ``reserve_decode`` (a block for every
running sequence's next position, preempting the newest sequences when the pool runs dry) -> decode.

Budgets per step: at most ``max_batch_size`` sequences running, at most ``max_prefill_tokens`` padded
prompt tokens prefilled together, and admission only while the pool keeps a small watermark of free blocks
for the running sequences to grow into.

Chunked prefill: while sequences are decoding, a prompt is prefilled at most ``prefill_chunk_tokens`` tokens
per step and all prompts together at most ``prefill_step_tokens`` (``plan_prefill``), so a long prompt does
not stall the running streams for its whole prefill, and a burst of short ones starts together; a
sequence stays in ``prefilling`` until its last chunk, whose logits give its first token. On an idle engine
a prompt is prefilled whole. Scoring and batch-invariant sequences are never split (their positions'
numbers must not depend on the chunking). A preempted sequence gives back every block and goes to the front of
the queue; when admitted again it recomputes its keys and values (prompt and the tokens generated so far,
which it keeps, so nothing is emitted twice) and carries on decoding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.textgen.blocks import BlockPool, chain_hashes, next_hash
from services.textgen.sequences import (
    EngineConfig,
    Finish,
    SequenceHandle,
    SequenceRequest,
    SequenceResult,
    TopK,
)

INVARIANT_CHAIN = b"batch-invariant scoring"  # the prefix-cache chain of packed passes (Seq.hash_seed)


@dataclass(eq=False)
class Seq:
    """One sequence's state in the engine (the request, what it produced, where its cache lives)."""

    handle: SequenceHandle
    req: SequenceRequest
    submitted_at: float
    generator: Any  # torch.Generator for sampled sequences, None for greedy
    top_p: float
    alone: bool = False  # batch-invariant: every forward pass of this sequence is its own
    guide: Any = None  # structured output: its walk through the constraint (guided.GuideState)
    stops: Any = None  # its stop strings' watch over the generated text (detokenizer.StopWatch)
    request_id: str = "-"
    blocks: list[int] = field(default_factory=list)  # block table: position p is in blocks[p // bs]
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of its full, written blocks
    num_computed: int = 0  # leading context tokens in its blocks: the prefix-cache hit, then prefill chunks
    chunk_end: int = 0  # where this step's prefill of its context ends
    order: int = -1  # admission order: preemption takes the highest
    preemptions: int = 0
    next_pos: int = 0  # keys/values are written for positions < next_pos; gen_ids[-1] goes at next_pos
    gen_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[TopK] = field(default_factory=list)
    prompt_logprobs: list[float] | None = None
    prompt_top: list[TopK] | None = None
    started_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    done: bool = False

    @property
    def resumed(self) -> bool:
        """Preempted after generating: admission recomputes its cache and samples nothing."""
        return bool(self.gen_ids)

    def context_len(self) -> int:
        """``len(self.context())``, without building it."""
        return len(self.req.prompt_ids) + max(0, len(self.gen_ids) - 1)

    def context(self) -> list[int]:
        """The tokens whose keys and values a (re)admission writes: the prompt, and after a preemption the
        generated tokens but the last (which the next decode step feeds)."""
        return [*self.req.prompt_ids, *self.gen_ids[:-1]]

    def result(self, reason: Finish, now: float, *, error: str | None, stop_sequence: str) -> SequenceResult:
        """What the caller gets when the sequence ends (at ``now``)."""
        return SequenceResult(
            prompt_ids=list(self.req.prompt_ids),
            token_ids=list(self.gen_ids),
            prompt_logprobs=self.prompt_logprobs,
            prompt_top=self.prompt_top,
            logprobs=self.logprobs if self.req.logprobs else None,
            top=self.top if self.req.top_logprobs else None,
            finish_reason=reason,
            stop_sequence=stop_sequence,
            queue_s=(self.started_at or now) - self.submitted_at,
            first_token_s=(self.first_token_at - self.submitted_at) if self.first_token_at else 0.0,
            total_s=now - self.submitted_at,
            error=error,
        )

    def token_at(self, pos: int) -> int:
        n = len(self.req.prompt_ids)
        return self.req.prompt_ids[pos] if pos < n else self.gen_ids[pos - n]

    @property
    def invariant_scoring(self) -> bool:
        """A batch-invariant prompt to score (nothing generated): computed in packed passes
        (``DecoderLM.prefill_packed``), whose every row is the same whatever it is computed with."""
        r = self.req
        return self.alone and r.stopping.max_new_tokens == 0 and bool(r.prompt_logprobs)

    @property
    def hash_seed(self) -> bytes | None:
        """Where its prefix-cache chain starts: invariant scoring reads and writes blocks of its own (written
        by packed passes, so a hit holds the bits its own pass would compute); everything else shares one."""
        return INVARIANT_CHAIN if self.invariant_scoring else None

    def cacheable_prefix(self) -> int:
        """How many leading context tokens may come from the prefix cache: all but the last (the last
        one's logits are needed), none before a scored position (its logits are needed too), none for a
        batch-invariant sequence that generates (its numerics must not depend on what ran before it)."""
        if self.alone and not self.invariant_scoring:
            return 0
        limit = self.context_len() - 1
        if self.req.prompt_logprobs and not self.resumed:
            limit = min(limit, self.req.scored_from - 1)
        return max(0, limit)


def chunkable(s: Seq) -> bool:
    """A sequence whose prefill may be split over steps: one that generates (scored prompt positions and
    batch-invariant sequences are computed in one forward pass)."""
    return not s.alone and not (s.req.prompt_logprobs and not s.resumed)


def packable(s: Seq) -> bool:
    """A prompt to score (nothing generated): it goes through packed passes, no padding, with the others.
    Batch-invariant ones (``invariant_scoring``) read only their own prefix-cache chain; with invariance off
    they share the common one."""
    r = s.req
    return r.stopping.max_new_tokens == 0 and bool(r.prompt_logprobs) and not s.resumed


def shared_key(s: Seq) -> tuple | None:
    """Scoring-only sequences (prompt log-probs, nothing generated) with the same key differ only in their
    last prompt token, e.g. the answers of a multiple-choice question: one forward pass scores them all."""
    r = s.req
    if r.stopping.max_new_tokens == 0 and r.prompt_logprobs and r.scored_from < len(r.prompt_ids):
        return (r.prompt_ids[:-1], r.top_logprobs, r.scored_from)
    return None


def share_prefills(group: list[Seq]) -> tuple[list[Seq], list[tuple[Seq, Seq]], list[tuple[Seq, Seq]]]:
    """Split sequences whose prefill completes this step into (those to compute, followers, twins).

    A follower (scoring-only, equal to an earlier one but for its last token: ``shared_key``) reads its
    representative's rows. A twin (a generating sequence with the same prompt and scoring as an earlier
    one, OpenAI's n) takes its representative's full blocks, a copy of its last block and its last logits
    row, then samples on its own. Followers and twins are paired with their representative, which is
    computed.
    """
    reps: dict[tuple, Seq] = {}
    twin_reps: dict[tuple, Seq] = {}
    compute: list[Seq] = []
    followers: list[tuple[Seq, Seq]] = []
    twins: list[tuple[Seq, Seq]] = []
    for s in group:
        key = shared_key(s)
        if key is not None:
            if key in reps:
                followers.append((s, reps[key]))
                continue
            reps[key] = s
        elif s.req.stopping.max_new_tokens > 0 and not s.resumed and s.num_computed == 0:
            r = s.req
            tkey = (r.prompt_ids, r.prompt_logprobs, r.top_logprobs, r.scored_from, s.alone)
            if tkey in twin_reps:
                twins.append((s, twin_reps[tkey]))
                continue
            twin_reps[tkey] = s
        compute.append(s)
    return compute, followers, twins


class Scheduler:
    def __init__(self, pool: BlockPool, cfg: EngineConfig) -> None:
        self.pool = pool
        self.cfg = cfg
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.prefilling: list[Seq] = []  # admitted, context not all computed yet (chunked prefill)
        self.preemptions = 0
        self._order = 0
        # keep a few blocks free for the running sequences to grow into before admitting more (vLLM: 1%)
        self.watermark = max(1, pool.usable // 100)

    def max_tokens(self) -> int:
        """The longest context one sequence can ever hold: every usable block."""
        return self.pool.usable * self.pool.block_size

    # -- admission -------------------------------------------------------------------------------------
    def admit(self, cancelled: Callable[[Seq], bool]) -> tuple[list[Seq], list[Seq]]:
        """Pop the waiting sequences that start this step: (admitted, cancelled ones to finish).

        An admitted sequence holds a block table covering its context, the leading blocks taken from the
        prefix cache where they were cached (``num_computed`` tokens need no computing). A scoring-only
        sequence that shares all but its last token with one admitted this step rides on that one's
        forward pass (``shared_key``) and takes no blocks.
        """
        group: list[Seq] = []
        gone: list[Seq] = []
        keys: set[tuple] = set()
        longest = 0
        pool, bs = self.pool, self.pool.block_size
        while self.waiting:
            s = self.waiting[0]
            if cancelled(s):
                gone.append(self.waiting.popleft())
                continue
            key = shared_key(s)
            if key is not None and key in keys:
                group.append(self.waiting.popleft())
                continue
            busy = bool(group or self.running or self.prefilling)
            if self.active() + sum(1 for g in group if g.blocks) >= self.cfg.max_batch_size:
                break
            ctx = s.context()
            hashes = chain_hashes(ctx, bs, limit=s.cacheable_prefix(), seed=s.hash_seed)
            hit = pool.peek(hashes)
            todo = len(ctx) - len(hit) * bs
            if self.running and chunkable(s):
                todo = min(todo, self.cfg.prefill_chunk_tokens)
            if group and max(longest, todo) * (len(group) + 1) > self.cfg.max_prefill_tokens:
                break
            need = pool.blocks_for(len(ctx)) - len(hit)
            # alone on an idle engine, a sequence may take the whole pool
            if pool.num_free_after(hit) - need < (self.watermark if busy else 0):
                break
            self.waiting.popleft()
            pool.lookup(hashes)  # takes the hit blocks, counts queries and hits
            s.blocks = hit + pool.allocate(need)
            s.hashes = hashes[: len(hit)]
            s.num_computed = len(hit) * bs
            s.order = self._order
            self._order += 1
            longest = max(longest, todo)
            group.append(s)
            if key is not None:
                keys.add(key)
        self.prefilling.extend(group)
        return group, gone

    def active(self) -> int:
        """Sequences holding blocks: decoding or being prefilled."""
        return len(self.running) + len(self.prefilling)

    def plan_prefill(self) -> list[tuple[Seq, int]]:
        """The prefill work of this step: (sequence, context position its keys and values reach). While
        sequences are decoding, each chunkable one gets at most ``prefill_chunk_tokens`` of the step's
        ``prefill_step_tokens``, in admission order (a sequence the budget does not reach waits for the next
        step); otherwise each is prefilled whole."""
        budget = self.cfg.prefill_step_tokens if self.running else None
        plan = []
        for s in self.prefilling:
            total = s.context_len()
            if budget is None or not chunkable(s):
                plan.append((s, total))
                continue
            take = min(total - s.num_computed, self.cfg.prefill_chunk_tokens, budget)
            if take > 0:
                budget -= take
                plan.append((s, s.num_computed + take))
        return plan

    # -- after a forward pass --------------------------------------------------------------------------
    def commit(self, s: Seq, written: int) -> None:
        """Positions < ``written`` of ``s`` now hold keys and values: register its newly full blocks."""
        bs = self.pool.block_size
        for i in range(len(s.hashes), min(written // bs, len(s.blocks))):
            h = next_hash(
                s.hashes[-1] if s.hashes else s.hash_seed,
                [s.token_at(p) for p in range(i * bs, (i + 1) * bs)],
            )
            self.pool.register(s.blocks[i], h)
            s.hashes.append(h)

    # -- decode ----------------------------------------------------------------------------------------
    def reserve_decode(self) -> list[Seq]:
        """A block for the next position of every running sequence, oldest first. When the pool is dry,
        the newest running sequence is preempted (blocks freed, back to the front of the queue) until the
        older ones fit. Returns the preempted sequences."""
        bs = self.pool.block_size
        preempted: list[Seq] = []
        for s in sorted(self.running, key=lambda x: x.order):
            if s.done or s in preempted:
                continue
            need = s.next_pos // bs + 1 - len(s.blocks)
            while need > 0 and self.pool.num_free() < need:
                victim = max((r for r in self.running if r not in preempted), key=lambda x: x.order)
                self._preempt(victim)
                preempted.append(victim)
                if victim is s:
                    break
            if s not in preempted and need > 0:
                s.blocks += self.pool.allocate(need)
        for s in reversed(preempted):  # the oldest preempted ends up first in the queue
            self.waiting.appendleft(s)
        return preempted

    def _preempt(self, s: Seq) -> None:
        self.running.remove(s)
        self.free(s)
        s.preemptions += 1
        self.preemptions += 1

    def free(self, s: Seq) -> None:
        """Give back every block of ``s`` (cached full blocks stay in the prefix cache); it leaves the
        prefilling list if it was there."""
        if s in self.prefilling:
            self.prefilling.remove(s)
        if s.blocks:
            self.pool.release(s.blocks)
        s.blocks, s.hashes, s.num_computed, s.chunk_end = [], [], 0, 0
