"""The scheduler alone, torch-free, with fake model outputs: admission budgets, the prefix cache,
preemption, and block accounting."""

from __future__ import annotations

import random
import subprocess
import sys

from services.textgen.blocks import BlockPool
from services.textgen.scheduler import Scheduler, Seq
from services.textgen.sequences import EngineConfig, SequenceRequest, StopSpec


class Handle:
    cancelled = False


def seq(prompt, n=8, *, scoring_from=0, alone=False) -> Seq:
    req = SequenceRequest(
        prompt_ids=tuple(prompt),
        sampling=None,  # the scheduler never samples
        stopping=StopSpec(max_new_tokens=n),
        prompt_logprobs=bool(scoring_from),
        prompt_logprobs_from=scoring_from,
    )
    return Seq(handle=Handle(), req=req, submitted_at=0.0, generator=None, top_p=0.0, alone=alone)


def sched(num_blocks=11, bs=4, *, batch=64, prefill=4096, caching=True) -> Scheduler:
    return Scheduler(BlockPool(num_blocks, bs, prefix_caching=caching), EngineConfig(batch, 1024, prefill))


def admit(s: Scheduler) -> list[Seq]:
    got, gone = s.admit(lambda q: q.handle.cancelled)
    assert not gone
    return got


def prefill(s: Scheduler, seqs: list[Seq]) -> list[Seq]:
    """What the engine does after a prefill: blocks written, the first token sampled (fake: 7). Returns
    the sequences that this first token finished."""
    done = []
    for q in seqs:
        ctx = q.context()
        s.commit(q, len(ctx))
        if q.resumed:
            q.next_pos = len(ctx)
        else:
            q.next_pos = len(q.req.prompt_ids)
            q.gen_ids.append(7)
            if len(q.gen_ids) >= q.req.stopping.max_new_tokens:
                s.free(q)
                done.append(q)
                continue
        s.running.append(q)
    return done


def decode(s: Scheduler) -> list[Seq]:
    """One decode step: blocks reserved, every running sequence writes a position and gets a token; the
    finished ones leave. Returns those that finished."""
    s.reserve_decode()
    done = []
    for q in list(s.running):
        q.next_pos += 1
        s.commit(q, q.next_pos)
        q.gen_ids.append(len(q.gen_ids) % 5)
        if len(q.gen_ids) >= q.req.stopping.max_new_tokens:
            s.running.remove(q)
            s.free(q)
            done.append(q)
    return done


def test_the_scheduler_does_not_import_torch():
    code = "import sys, services.textgen.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_admission_is_bounded_by_free_blocks_with_a_watermark():
    s = sched(num_blocks=11, bs=4)  # 10 usable blocks, watermark 1
    s.waiting.extend(seq(range(i * 10, i * 10 + 8)) for i in range(6))  # 2 blocks each
    got = admit(s)
    assert len(got) == 4 and all(len(q.blocks) == 2 for q in got)  # 8 taken, 2 left >= watermark
    assert len(s.waiting) == 2 and s.pool.num_free() == 2


def test_an_idle_engine_admits_a_sequence_that_needs_the_whole_pool():
    s = sched(num_blocks=5, bs=4)
    s.waiting.append(seq(range(16)))
    assert len(admit(s)) == 1 and s.pool.num_free() == 0


def test_admission_is_bounded_by_running_sequences_and_the_prefill_budget():
    s = sched(num_blocks=101, bs=4, batch=3)
    s.waiting.extend(seq(range(i, i + 5)) for i in range(5))
    assert len(admit(s)) == 3
    s = sched(num_blocks=101, bs=4, prefill=20)
    s.waiting.extend(seq(range(i, i + 8)) for i in range(5))
    assert len(admit(s)) == 2  # 2 x 8 padded tokens fit in 20, 3 x 8 do not


def test_a_cached_prefix_is_taken_not_computed():
    s = sched(num_blocks=21, bs=4)
    first = seq(list(range(100, 113)))  # 13 tokens: 3 full blocks
    s.waiting.append(first)
    prefill(s, admit(s))
    assert first.num_computed == 0 and len(first.hashes) == 3
    second = seq(list(range(100, 112)) + [1, 2, 3])  # same 12 first tokens
    s.waiting.append(second)
    (got,) = admit(s)
    assert got.num_computed == 12 and got.blocks[:3] == first.blocks[:3]
    assert [s.pool.refcount(b) for b in got.blocks[:3]] == [2, 2, 2]
    assert s.pool.hits == 12 and s.pool.queries == 12 + 12  # the first queried 3 blocks and missed
    # the same prompt again: all but its last token may come from the cache, so 2 of 3 full blocks of 12
    third = seq(list(range(100, 112)))
    s.waiting.append(third)
    (got,) = admit(s)
    assert got.num_computed == 8


def test_scored_positions_and_batch_invariant_sequences_are_never_taken_from_the_cache():
    s = sched(num_blocks=21, bs=4)
    first = seq(list(range(50, 66)))
    s.waiting.append(first)
    prefill(s, admit(s))
    scored = seq(list(range(50, 66)), n=0, scoring_from=6)  # scores tokens 6.. : needs hidden state 5..
    alone = seq(list(range(50, 66)), alone=True)
    s.waiting.extend([scored, alone])
    a, b = admit(s)
    assert a.num_computed == 4  # one block: positions 0..3, all before position 5
    assert b.num_computed == 0


def test_the_newest_sequence_is_preempted_when_blocks_run_out_and_resumes_with_its_tokens():
    s = sched(num_blocks=7, bs=4)  # 6 usable blocks
    old, new = seq(range(10, 17), n=30), seq(range(20, 27), n=30)
    s.waiting.extend([old, new])
    prefill(s, admit(s))  # 2 + 2 blocks
    for _ in range(8):
        decode(s)
    assert new in s.waiting and new not in s.running and new.blocks == [] and new.preemptions == 1
    assert old in s.running and s.preemptions == 1
    kept = list(new.gen_ids)
    assert len(kept) > 1
    assert new.context() == [*range(20, 27), *kept[:-1]]  # what re-admission recomputes
    s.pool.check()


def test_random_workload_never_loses_a_token_or_a_block():
    """Many sequences through a pool far too small for them all: every one finishes with exactly its
    max_new_tokens tokens, the pool stays consistent at every step, and every block comes back."""
    rng = random.Random(3)
    s = sched(num_blocks=17, bs=4, batch=8, prefill=64)  # 16 usable blocks of 4 tokens
    seqs = [
        seq([rng.randrange(50) for _ in range(rng.randint(1, 20))], n=rng.randint(1, 24)) for _ in range(60)
    ]
    s.waiting.extend(seqs)
    finished: list[Seq] = []
    for _ in range(5000):
        if not (s.waiting or s.running):
            break
        finished += prefill(s, admit(s))
        finished += decode(s)
        s.pool.check()
    assert len(finished) == len(seqs)
    assert all(len(q.gen_ids) == q.req.stopping.max_new_tokens for q in seqs)
    assert s.preemptions > 0  # the workload did run the pool dry
    assert s.pool.num_free() == s.pool.usable


def test_prefill_is_chunked_only_while_others_decode_and_never_for_scoring():
    s = sched(num_blocks=201, bs=4)
    s.cfg = EngineConfig(64, 1024, 4096, prefill_chunk_tokens=10, prefill_step_tokens=15)
    long = seq(range(100, 137), n=4)  # 37 tokens
    s.waiting.append(long)
    admit(s)
    assert s.plan_prefill() == [(long, 37)]  # idle engine: whole
    s.prefilling.clear()
    s.free(long)
    s.running.append(seq(range(5), n=4))  # something decodes now
    long, other, scored = (
        seq(range(100, 137), n=4),
        seq(range(300, 312), n=4),
        seq(range(400, 430), n=0, scoring_from=3),
    )
    s.waiting.extend([long, other, scored])
    admit(s)
    plan = s.plan_prefill()
    # a chunk of at most 10 each, 15 in all, oldest first; scoring is whole
    assert plan == [(long, 10), (other, 5), (scored, 30)]
    for q, end in plan:
        q.num_computed = end
    assert s.plan_prefill()[:2] == [(long, 20), (other, 10)]


def test_a_burst_of_short_prompts_starts_in_one_step_while_others_decode():
    s = sched(num_blocks=401, bs=4)
    s.cfg = EngineConfig(64, 1024, 4096, prefill_chunk_tokens=32, prefill_step_tokens=512)
    s.running.append(seq(range(5), n=4))
    burst = [seq(range(100 + 40 * i, 132 + 40 * i), n=4) for i in range(20)]  # 20 prompts of 32 tokens
    s.waiting.extend(burst)
    admit(s)
    assert s.plan_prefill() == [(q, 32) for q in burst[:16]]  # 512 tokens: 16 whole prompts


def test_multiple_choice_answers_follow_and_equal_prompts_are_twins():
    from services.textgen.scheduler import share_prefills

    ctx = list(range(10, 20))
    a, b = seq(ctx + [1], n=0, scoring_from=10), seq(ctx + [2], n=0, scoring_from=10)  # answers 1 and 2
    g1, g2, g3 = seq(ctx, n=5), seq(ctx, n=5), seq(ctx, n=5, alone=True)
    compute, followers, twins = share_prefills([a, b, g1, g2, g3])
    assert compute == [a, g1, g3] and followers == [(b, a)] and twins == [(g2, g1)]
