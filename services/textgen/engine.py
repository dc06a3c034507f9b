"""Continuous batching over a paged KV cache: sequences join the running batch between decode steps and
leave when done.

One engine thread owns the model and the KV cache. Each loop iteration reads schedule -> execute ->
update: the :class:`~services.textgen.scheduler.Scheduler` admits waiting sequences (block tables, prefix
cache hits, budgets), the engine prefills what the cache did not have, the scheduler reserves a block for
every running sequence's next position (preempting the newest when the pool is dry), and one decode step
runs for every running sequence. Callers talk to it through :class:`SequenceHandle`: events arrive on a
queue (tokens as they are produced, then the result), and ``cancel()`` frees the blocks before the next step.

Failures are contained per sequence: a forward pass that raises for a group is run again for each of
its sequences alone, and the sampling, log-probs, accept and stop detection of each sequence run
under their own guard, so a fault ends exactly the sequences it belongs to (with an error naming
their request id, their blocks freed) and every other sequence goes on at the next step.
``last_progress_at`` (a token accepted or a sequence finished) is what the health watchdog reads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from services.textgen import choosing, containment
from services.textgen import metrics as M
from services.textgen.blocks import BlockPool
from services.textgen.detokenizer import StopWatch
from services.textgen.guided import GuideState
from services.textgen.modeling import DecoderLM, PagedKVCache
from services.textgen.sampling import make_generator
from services.textgen.scheduler import Scheduler, Seq, packable, share_prefills
from services.textgen.sequences import (
    CANCELLED,
    ERROR,
    LENGTH,
    EngineConfig,
    SequenceHandle,
    SequenceRequest,
    TokenEvent,
    TokenizerInfo,
    TopK,
)
from shared.errors import InvalidArgument, ResourceExhausted
from shared.logging import REQUEST_ID

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: DecoderLM, cache: PagedKVCache, tok: TokenizerInfo, cfg: EngineConfig) -> None:
        self.model = model
        self.cache = cache
        self.tok = tok
        self.cfg = cfg
        self.pool = BlockPool(cache.num_blocks, cache.block_size, prefix_caching=cfg.prefix_caching)
        self.sched = Scheduler(self.pool, cfg)
        self.max_len = model.max_len
        if self.sched.max_tokens() < self.max_len:
            raise ValueError(
                f"the KV cache holds {self.sched.max_tokens()} tokens, fewer than one sequence of the "
                f"context length ({self.max_len})"
            )
        self._cv = threading.Condition()
        self._stopping = False
        self._loop_active = False
        self._thread: threading.Thread | None = None
        self.last_progress_at = time.monotonic()  # a token accepted or a sequence finished
        self.steps = 0
        self.peak_running = 0  # the most sequences decoded together so far
        self._reported = (0, 0, 0)  # prefix-cache queries, hits, preemptions already counted in metrics
        # the decode step that rides on this step's prefill forward pass (see _prefill_and_decode)
        self._riders: list[Seq] = []
        self._rider_outs: list[tuple[torch.Tensor, int]] | None = None

    @property
    def _running(self) -> list[Seq]:
        return self.sched.running

    # -- public API (any thread) -----------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Run the engine loop in the calling thread until ``stop`` is set or :meth:`stop` is called.

        The service runs it on the process's main thread: on CPU, torch's OpenMP workers serve the
        main thread's parallel regions about 1.5x faster than another thread's (28 vs 42 ms per
        SmolLM2 decode step measured here).
        """
        self._loop_active = True
        try:
            with torch.inference_mode():
                while self._wait_for_work(stop):
                    self._step()
        finally:
            self._loop_active = False
            self._fail_all("the engine stopped")

    def start(self) -> None:
        """Run the loop on a background thread (tests and tools; the service uses :meth:`run`)."""
        self._thread = threading.Thread(target=self.run, name="textgen-engine", daemon=True)
        self._thread.start()

    def run_until_idle(self) -> None:
        """Step in the calling thread until nothing waits or runs (warm-up before the loop starts)."""
        with torch.inference_mode():
            while self.sched.waiting or self.sched.active():
                self._step()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def is_alive(self) -> bool:
        return self._loop_active

    def load(self) -> tuple[int, int]:
        with self._cv:
            return len(self.sched.waiting), self.sched.active()

    def validate(self, req: SequenceRequest) -> None:
        n = len(req.prompt_ids)
        if n == 0:
            raise InvalidArgument("prompt is empty (set add_BOS or give at least one token)", field="prompts")
        if n + req.stopping.max_new_tokens > self.max_len:
            # Megatron's exact message; the numbers go to the log.
            logger.info(
                "rejected: prompt %d + tokens_to_generate %d > %d",
                n,
                req.stopping.max_new_tokens,
                self.max_len,
            )
            raise InvalidArgument(
                "Length of prompt + tokens_to_generate longer than allowed", field="tokens_to_generate"
            )
        bad = [t for t in req.prompt_ids if not 0 <= t < self.tok.vocab_size]
        if bad:
            raise InvalidArgument(
                f"token id {bad[0]} is outside the vocabulary (0..{self.tok.vocab_size - 1})", field="prompt"
            )

    def submit(
        self, reqs: list[SequenceRequest], sink: queue.SimpleQueue | None = None
    ) -> list[SequenceHandle]:
        """Queue sequences (all or none). Raises InvalidArgument or ResourceExhausted."""
        for r in reqs:
            self.validate(r)
        now = time.monotonic()
        rid = REQUEST_ID.get()
        handles = []
        with self._cv:
            if not self.sched.waiting and not self.sched.active():
                self.last_progress_at = now  # progress is measured from when the engine became busy
            if self._stopping:
                raise ResourceExhausted("the engine is shutting down")
            waiting = len(self.sched.waiting)
            if waiting + len(reqs) > self.cfg.max_queue_size:
                M.FAILURE.labels("overloaded").inc(len(reqs))
                raise ResourceExhausted(
                    f"queue full: {waiting} sequences waiting (limit {self.cfg.max_queue_size}); retry later"
                )
            for index, r in enumerate(reqs):
                h = SequenceHandle(self, index, sink)
                s = r.sampling
                self.sched.waiting.append(
                    Seq(
                        handle=h,
                        req=r,
                        submitted_at=now,
                        top_p=s.top_p,
                        request_id=rid,
                        generator=None if s.is_greedy else make_generator(s.seed, self.model.device),
                        alone=self._alone(r),
                        guide=self._guide(r),
                    )
                )
                handles.append(h)
            M.NUM_WAITING.set(len(self.sched.waiting))
            self._cv.notify_all()
        return handles

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # -- engine thread ---------------------------------------------------------------------------
    def _alone(self, r: SequenceRequest) -> bool:
        """Batch-invariant mode: the sequences that must reproduce (``scoring``: scoring-only ones, and
        sampled ones with a seed) or every sequence (``all``) run their forward passes alone, so their tokens
        and log-probs are the same bits at any load, in any order."""
        mode = self.cfg.batch_invariant
        if mode == "all":
            return True
        scoring = r.stopping.max_new_tokens == 0 and r.prompt_logprobs
        seeded = not r.sampling.is_greedy and r.sampling.seed >= 0
        return mode == "scoring" and (scoring or seeded)

    def _guide(self, r: SequenceRequest) -> GuideState | None:
        """A structured-output sequence's own walk through its compiled constraint."""
        return GuideState(r.guide_index, self.model.out_w.shape[0]) if r.guide_index is not None else None

    def _groups(self, seqs: list[Seq]) -> list[list[Seq]]:
        """The forward passes of one step: the batchable sequences together; the prompts to score together in
        one packed pass (``DecoderLM.prefill_packed``: no padding, each row's numbers its own whatever else
        is packed with it); every other batch-invariant sequence alone."""
        together = [s for s in seqs if not s.alone and not packable(s)]
        packed = [s for s in seqs if packable(s)]
        alone = [[s] for s in seqs if s.alone and not packable(s)]
        return ([together] if together else []) + ([packed] if packed else []) + alone

    def _wait_for_work(self, stop: threading.Event | None) -> bool:
        with self._cv:
            while not self.sched.waiting and not self.sched.active():
                if self._stopping or (stop is not None and stop.is_set()):
                    return False
                self._cv.wait(timeout=0.25)
            return not (self._stopping or (stop is not None and stop.is_set()))

    def _step(self) -> None:
        with self._cv:
            admitted, gone = self.sched.admit(lambda s: s.handle.cancelled)
        for s in gone:
            self._finish(s, CANCELLED)
        try:
            self._reap_cancelled()
            plan = self.sched.plan_prefill()
            if plan and self._running:
                self._prefill_and_decode(plan)
            elif plan:
                self._prefill(plan)
            elif self._running:
                with self._cv:  # preempted sequences go back to the queue that submit() appends to
                    self.sched.reserve_decode()
                if self._running:
                    self._decode(list(self._running))
        except Exception as e:  # noqa: BLE001 - last line of defence: the loop never dies, nothing stays stuck
            # The per-stage guards below catch every fault of a sequence's work; reaching here means the
            # engine's own bookkeeping failed, so nothing it holds can be trusted to advance.
            logger.exception(
                "engine step failed outside a sequence's work; failing %d running sequences",
                len(self._running),
            )
            for seq in [*admitted, *self.sched.prefilling, *self._running]:
                self._fail(seq, "step", e)
        self.steps += 1
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.peak_running = max(self.peak_running, len(self._running))  # decoding together
        now = (self.pool.queries, self.pool.hits, self.sched.preemptions)
        M.report_engine(len(self.sched.waiting), self.sched.active(), self.pool.usage(), now, self._reported)
        self._reported = now

    def _reap_cancelled(self) -> None:
        for s in [s for s in [*self.sched.prefilling, *self._running] if s.handle.cancelled]:
            self._finish(s, CANCELLED)

    # -- failure containment ----------------------------------------------------------------------
    def _fail(self, s: Seq, stage: str, e: BaseException) -> None:
        """End ``s`` with an error naming its request; its blocks are freed. Never raises."""
        if s.done:
            return
        logger.error(
            "request_id=%s: %s failed: %s: %s",
            s.request_id,
            stage,
            type(e).__name__,
            e,
            exc_info=(type(e), e, e.__traceback__),
        )
        try:
            self._finish(
                s,
                ERROR,
                error=f"generation failed in {stage} (request_id={s.request_id}): {type(e).__name__}",
            )
        except Exception:  # noqa: BLE001 - the handle's queue itself failed: at least give the blocks back
            logger.exception("request_id=%s: could not report the failure", s.request_id)
            self._release(s)

    def _batched(
        self, group: list[Seq], forward: Callable[[list[Seq]], list], stage: str
    ) -> list[tuple[Seq, object]]:
        return containment.batched(group, forward, stage, self._fail)

    def _guarded(self, s: Seq, stage: str, work: Callable[[], None]) -> None:
        containment.guarded(s, stage, work, self._fail)

    # -- prefill -------------------------------------------------------------------------------------
    def _prefill_and_decode(self, plan: list[tuple[Seq, int]]) -> None:
        """Prefill work while sequences decode: their decode step rides on the prefill's forward pass (one
        pass, the weights read once: chunked prefill then costs the streams little). Batch-invariant
        sequences, and every decoding sequence when that pass fails, get a decode pass of their own;
        sequences whose prefill completes now decode from the next step on."""
        with self._cv:  # preempted sequences go back to the queue that submit() appends to
            self.sched.reserve_decode()
        decoding = list(self._running)
        riders = [s for s in decoding if not s.alone]
        self._riders, self._rider_outs = riders, None
        try:
            self._prefill(plan)
            outs = self._rider_outs
        finally:
            self._riders, self._rider_outs = [], None
        if outs is not None:
            M.BATCH_SIZE.observe(len(riders))
            for s, (row, pick) in zip(riders, outs):
                if not s.done:
                    self._guarded(
                        s, "sampling", lambda s=s, row=row, pick=pick: self._decode_accept(s, row, pick)
                    )
        rest = [s for s in decoding if not s.done and (outs is None or s.alone)]
        if rest:
            self._decode(rest)

    def _prefill(self, plan: list[tuple[Seq, int]]) -> None:
        """Run this step's prefill work: each sequence's context up to its planned end. A sequence whose
        context is complete leaves ``prefilling`` (to decode, or finished); the others wait for their
        next chunk."""
        now = time.monotonic()
        group: list[Seq] = []
        partial: list[Seq] = []
        for s, end in plan:
            s.chunk_end = end
            if s.started_at == 0.0:
                s.started_at = now
                M.QUEUE_TIME.observe(now - s.submitted_at)
            if end == s.context_len():
                self.sched.prefilling.remove(s)
                group.append(s)
            else:
                partial.append(s)
        # multiple-choice answers share one forward pass, OpenAI's n one prefill (see share_prefills)
        compute, followers, twins = share_prefills(group)
        compute = partial + compute
        outs = {
            id(s): out
            for part in self._groups(compute)
            for s, out in self._batched(part, self._prefill_forward, "prefill")
        }
        M.PROMPT_TOKENS.inc(sum(len(s.req.prompt_ids) for s in group if not s.resumed))
        for s, rep in followers:  # before the representatives finish: they read their rows
            if id(rep) not in outs:
                self._fail(s, "prefill", RuntimeError("the shared forward pass failed"))
                continue
            self._guarded(s, "scoring", lambda s=s, rep=rep: self._follow(s, rep, outs[id(rep)][2]))
        for s, rep in twins:  # before the representatives run on: their blocks may be freed when they finish
            if id(rep) not in outs:
                self._fail(s, "prefill", RuntimeError("the shared forward pass failed"))
                continue
            self._guarded(s, "prefill", lambda s=s, rep=rep: self._twin(s, rep, *outs[id(rep)][:2]))
        if partial:
            self.last_progress_at = time.monotonic()  # a chunk of a long prompt is progress too
        for s in compute:
            if id(s) in outs and s not in partial:
                row, pick, _ = outs[id(s)]
                self._guarded(
                    s, "sampling", lambda s=s, row=row, pick=pick: self._after_prefill(s, row, pick)
                )

    def _tables(self, seqs: list[Seq]) -> torch.Tensor:
        """Block tables [B, nb], padded with the null block."""
        width = max(len(s.blocks) for s in seqs)
        return torch.tensor(
            [s.blocks + [0] * (width - len(s.blocks)) for s in seqs],
            dtype=torch.long,
            device=self.model.device,
        )

    def _prefill_forward(self, compute: list[Seq]) -> list[tuple]:
        """Prefill what the prefix cache did not hold of ``compute``. Per sequence: (last logits row or None,
        pick, score row)."""
        contexts = [s.context() for s in compute]
        starts = [s.num_computed for s in compute]
        ends = [s.chunk_end for s in compute]
        lengths = [e - a for e, a in zip(ends, starts)]
        last = [e == len(c) for e, c in zip(ends, contexts)]  # the final chunk: logits are needed
        t0 = time.perf_counter()
        packed = all(packable(s) for s in compute)
        riders: list[Seq] = []
        if not (compute[0].alone or packed):  # the decode step rides on one padded prefill pass per step
            riders, self._riders = self._riders, []
        # hidden[j]: sequence j's rows, row i = position starts[j] + i ((B, T, H) padded, or one per prompt)
        hidden: torch.Tensor | list[torch.Tensor] | None = None
        if packed:  # whole prompts, packed without padding
            hidden = self.model.prefill_packed(contexts, starts, self._tables(compute), self.cache)
        else:
            T = max(lengths)
            padded = [c[a:e] + [0] * (T - n) for c, a, e, n in zip(contexts, starts, ends, lengths)]
            tokens = torch.tensor(padded, dtype=torch.long, device=self.model.device)  # (B, T), one copy
        if riders:
            try:
                d_tokens, d_positions = self._decode_inputs(riders)
                d_hidden, hidden = self.model.step(
                    (d_tokens, d_positions, self._tables(riders)),
                    (tokens, starts, lengths, self._tables(compute)),
                    self.cache,
                )  # (D, H), (B, T, H)
                d_logits = self.model.logits(d_hidden)  # (D, V)
                self._rider_outs = list(zip(d_logits, self._argmax_rows(d_logits)))
            except Exception as e:  # noqa: BLE001 - contained: prefill and decode then run apart
                logger.warning(
                    "the shared prefill + decode pass failed (%s: %s); running them apart",
                    type(e).__name__,
                    e,
                )
                riders, hidden = [], None
        if hidden is None:
            hidden = self.model.prefill(
                tokens, starts, lengths, self._tables(compute), self.cache
            )  # (B, T, H)
        M.PREFILL_COMPUTED_TOKENS.inc(sum(lengths))
        for s, e in zip(compute, ends):
            self.sched.commit(s, e)
            s.num_computed = e
        decoding = [
            j
            for j, s in enumerate(compute)
            if last[j] and s.req.stopping.max_new_tokens > 0 and not s.resumed
        ]
        rows: list[torch.Tensor | None] = [None] * len(compute)
        picks: list[int | None] = [None] * len(compute)
        if decoding:
            last_logits = self.model.logits(
                torch.stack([hidden[j][lengths[j] - 1] for j in decoding])
            )  # (D, V)
            for j, row, pick in zip(decoding, last_logits, self._argmax_rows(last_logits)):
                rows[j], picks[j] = row, pick
        score_rows: list[torch.Tensor | None] = [None] * len(compute)
        scoring = [j for j, s in enumerate(compute) if last[j] and s.req.prompt_logprobs and not s.resumed]
        if scoring:
            # one lm-head matmul for every scored position of the group (not one per sequence); row i of
            # hidden is position starts[j] + i, and the cache never holds a scored position's predecessor
            spans = [
                (compute[j].req.scored_from - 1 - starts[j], len(contexts[j]) - 1 - starts[j])
                for j in scoring
            ]
            flat = torch.cat(
                [hidden[j][a:b] for j, (a, b) in zip(scoring, spans) if b > a] or [hidden[0][:0]]
            )  # (N, H)
            logits = self.model.logits_invariant(flat) if packed else self.model.logits(flat)
            logp = torch.log_softmax(logits.float(), dim=-1) if len(flat) else None  # (N, V)
            start = 0
            for j, (a, b) in zip(scoring, spans):
                n = max(0, b - a)
                score_rows[j] = self._score_prompt(compute[j], logp[start : start + n] if n else None)
                start += n
        M.FORWARD_TIME.labels("mixed" if riders else "prefill").observe(time.perf_counter() - t0)
        return list(zip(rows, picks, score_rows))

    def _twin(self, s: Seq, rep: Seq, row: torch.Tensor, pick: int) -> None:
        """``s`` has ``rep``'s prompt: it takes ``rep``'s full blocks (shared) and a copy of its last one."""
        n, bs = len(s.req.prompt_ids), self.pool.block_size
        full = n // bs
        self.pool.release(s.blocks[:full])
        self.pool.share(rep.blocks[:full])
        s.blocks[:full] = rep.blocks[:full]
        s.hashes = list(rep.hashes[:full])
        if n % bs:
            self.cache.copy_block(rep.blocks[full], s.blocks[full])
        s.prompt_logprobs = None if rep.prompt_logprobs is None else list(rep.prompt_logprobs)
        s.prompt_top = None if rep.prompt_top is None else list(rep.prompt_top)
        self._after_prefill(s, row, pick)

    def _follow(self, s: Seq, rep: Seq, row: torch.Tensor | None) -> None:
        s.prompt_logprobs = [*rep.prompt_logprobs[:-1], float(row[s.req.prompt_ids[-1]])]
        s.prompt_top = list(rep.prompt_top) if rep.prompt_top is not None else None
        s.next_pos = len(s.req.prompt_ids)
        M.REQUEST_PROMPT_TOKENS.observe(s.next_pos)
        self._finish(s, LENGTH)

    def _after_prefill(self, s: Seq, row: torch.Tensor | None, pick: int | None) -> None:
        if s.resumed:  # a preempted sequence has its cache back: it decodes on from its last token
            s.next_pos = len(s.req.prompt_ids) + len(s.gen_ids) - 1
            self._running.append(s)
            return
        s.next_pos = len(s.req.prompt_ids)
        M.REQUEST_PROMPT_TOKENS.observe(s.next_pos)
        if s.req.stopping.max_new_tokens == 0:
            self._finish(s, LENGTH)
            return
        self._running.append(s)
        self._choose_and_accept(s, row, pick)

    def _score_prompt(self, s: Seq, logp: torch.Tensor | None) -> torch.Tensor | None:
        """Prompt log-probs (and top-k) of ``s`` from its rows of log-probs (row i predicts prompt token
        ``scored_from + i``); returns the row that predicts its last token."""
        s.prompt_logprobs, s.prompt_top = choosing.prompt_scores(s.req, logp)
        return None if logp is None else logp[-1]

    # -- decode --------------------------------------------------------------------------------------
    def _decode(self, seqs: list[Seq]) -> None:
        outs = [o for part in self._groups(seqs) for o in self._batched(part, self._decode_forward, "decode")]
        M.BATCH_SIZE.observe(len(seqs))
        for s, (row, pick) in outs:
            self._guarded(s, "sampling", lambda s=s, row=row, pick=pick: self._decode_accept(s, row, pick))

    def _decode_forward(self, seqs: list[Seq]) -> list[tuple[torch.Tensor, int]]:
        """One decode step of ``seqs``: per sequence its logits row [V] and its argmax."""
        tokens, positions = self._decode_inputs(seqs)
        t0 = time.perf_counter()
        hidden = self.model.decode(tokens, positions, self._tables(seqs), self.cache)
        logits = self.model.logits(hidden)  # (B, V)
        picks = self._argmax_rows(logits)
        M.FORWARD_TIME.labels("decode").observe(time.perf_counter() - t0)
        return list(zip(logits, picks))

    def _decode_inputs(self, seqs: list[Seq]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's last token and its position [B], [B]."""
        dev = self.model.device
        tokens = torch.tensor([s.gen_ids[-1] for s in seqs], dtype=torch.long, device=dev)  # (B,)
        positions = torch.tensor([s.next_pos for s in seqs], dtype=torch.long, device=dev)  # (B,)
        return tokens, positions

    def _decode_accept(self, s: Seq, row: torch.Tensor, pick: int) -> None:
        s.next_pos += 1
        self.sched.commit(s, s.next_pos)
        self._choose_and_accept(s, row, pick)

    # -- choose and accept (one sequence) ------------------------------------------------------------
    def _argmax_rows(self, logits: torch.Tensor) -> list[int]:
        """Greedy picks of a batch of rows [B, V] in one call, within the tokenizer's vocabulary."""
        return torch.argmax(logits[:, : self.tok.vocab_size], dim=-1).tolist()

    def _choose_and_accept(self, s: Seq, row: torch.Tensor, pick: int) -> None:
        """Pick the next token of ``s`` from its logits row [V] (``pick`` is its argmax) and record it."""
        allowed = None  # the constraint's mask, unless the row's argmax is the choice and it allows it
        if s.guide is not None and not (choosing.takes_the_argmax(s.req, s.gen_ids) and s.guide.allows(pick)):
            allowed = s.guide.allowed(row.device)
        t, s.top_p = choosing.choose_token(
            s.req, s.gen_ids, row, pick, self.tok, s.top_p, s.generator, allowed
        )
        if s.guide is not None and t not in self.tok.ends:
            s.guide.advance(t)
        lp, top = None, None
        if s.req.logprobs or s.req.top_logprobs > 0:
            lp, top = choosing.token_logprobs(row, t, s.req.top_logprobs)
        self._accept(s, t, lp, top, time.monotonic())

    def _accept(self, s: Seq, token: int, lp: float | None, top: TopK | None, now: float) -> None:
        s.gen_ids.append(token)
        if s.req.logprobs:
            s.logprobs.append(lp if lp is not None else 0.0)
        if top is not None:
            s.top.append(top)
        if s.first_token_at == 0.0:
            s.first_token_at = now
            M.TTFT.observe(now - s.submitted_at)
        else:
            M.ITL.observe(now - s.last_token_at)
        s.last_token_at = now
        self.last_progress_at = now
        M.GENERATION_TOKENS.inc()
        s.handle._put(TokenEvent(token, lp if s.req.logprobs else None, top))
        reason, matched = self._stop_reason(s, token)
        if reason is not None:
            self._finish(s, reason, stop_sequence=matched)

    def _stop_reason(self, s: Seq, token: int) -> tuple[str | None, str]:
        seen = None
        if s.req.stopping.stop:
            if s.stops is None:  # the incremental detokenization streaming uses, O(1) per token
                s.stops = StopWatch(self.tok.decode, s.req.stopping.stop)
            seen = s.stops.push(token)
        return choosing.stop_reason(s.req, s.gen_ids, token, self.tok, seen, s.next_pos + 1 >= self.max_len)

    def _release(self, s: Seq) -> None:
        """``s`` leaves the batch: done, out of the running list, its blocks given back."""
        s.done = True
        if s in self._running:
            self._running.remove(s)
        self.sched.free(s)

    def _finish(self, s: Seq, reason: str, *, error: str | None = None, stop_sequence: str = "") -> None:
        if s.done:
            return
        self._release(s)
        now = time.monotonic()
        self.last_progress_at = now
        if reason == CANCELLED:
            M.FAILURE.labels(CANCELLED).inc()
        elif reason == ERROR:
            M.FAILURE.labels("generation").inc()
        else:
            M.SUCCESS.labels(reason).inc()
            M.E2E.observe(now - s.submitted_at)
            M.REQUEST_GENERATION_TOKENS.observe(len(s.gen_ids))
        s.handle._put(s.result(reason, now, error=error, stop_sequence=stop_sequence))

    def _fail_all(self, why: str) -> None:
        with self._cv:
            pending = list(self.sched.waiting) + list(self.sched.prefilling) + list(self._running)
            self.sched.waiting.clear()
        for s in pending:
            self._finish(s, ERROR, error=why)
