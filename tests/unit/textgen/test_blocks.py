"""The KV block pool: reference counts, the prefix cache's chain hashes, LRU eviction."""

from __future__ import annotations

import random

import pytest

from services.textgen.blocks import NULL_BLOCK, BlockPool, chain_hashes, next_hash


def test_null_block_is_never_handed_out_and_every_block_comes_back():
    pool = BlockPool(9, 4)
    assert pool.usable == 8 and pool.num_free() == 8
    got = pool.allocate(8)
    assert NULL_BLOCK not in got and sorted(got) == list(range(1, 9))
    assert pool.num_free() == 0 and pool.usage() == 1.0
    with pytest.raises(ValueError, match="1 blocks asked for, 0 free"):
        pool.allocate(1)
    pool.release(got)
    pool.check()
    assert pool.num_free() == 8 and pool.usage() == 0.0
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(got[:1])


def test_chain_hash_names_a_block_by_everything_before_it():
    a = chain_hashes(list(range(10)), 4)
    assert len(a) == 2  # only full blocks
    assert chain_hashes(list(range(8)) + [99, 98], 4) == a  # the partial tail does not matter
    b = chain_hashes([7] + list(range(1, 10)), 4)  # first block differs: so does every later hash
    assert a[0] != b[0] and a[1] != b[1]
    assert next_hash(a[0], list(range(4, 8))) == a[1] and next_hash(None, list(range(4))) == a[0]
    assert chain_hashes(list(range(10)), 4, limit=7) == a[:1]


def test_a_registered_prefix_is_found_shared_and_counted():
    pool = BlockPool(9, 4)
    toks = list(range(100, 112))
    hashes = chain_hashes(toks, 4)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, hashes):
        pool.register(b, h)
    pool.release(blocks)  # nobody holds them: cached, and still counted free
    assert pool.num_free() == 8 and pool.num_cached() == 3
    other = chain_hashes(toks[:8] + [1, 2, 3, 4], 4)
    hit = pool.lookup(other)
    assert hit == blocks[:2]  # the first two blocks match, the third does not
    assert (pool.queries, pool.hits) == (12, 8)
    assert [pool.refcount(b) for b in hit] == [1, 1] and pool.num_free() == 6
    pool.release(hit)
    pool.check()


def test_free_blocks_go_first_then_the_least_recently_released_cached_ones():
    pool = BlockPool(5, 2)
    old, new = pool.allocate(2)
    pool.register(old, b"old")
    pool.register(new, b"new")
    pool.release([old])
    pool.release([new])
    fresh = pool.allocate(2)  # the two never-cached blocks
    assert set(fresh) == {3, 4} and pool.num_cached() == 2
    (evicted,) = pool.allocate(1)
    assert evicted == old and pool.evictions == 1  # least recently released first
    assert pool.peek([b"old"]) == [] and pool.peek([b"new"]) == [new]
    pool.release([*fresh, evicted])
    pool.check()


def test_a_second_copy_of_a_cached_block_is_not_registered_and_is_freed():
    pool = BlockPool(4, 2)
    a, b = pool.allocate(2)
    pool.register(a, b"h")
    pool.register(b, b"h")
    assert pool.num_cached() == 1
    pool.release([b])
    pool.release([a])
    assert pool.peek([b"h"]) == [a]
    pool.check()


def test_prefix_caching_off_finds_nothing():
    pool = BlockPool(4, 2, prefix_caching=False)
    (a,) = pool.allocate(1)
    pool.register(a, b"h")
    assert pool.lookup([b"h"]) == [] and pool.hits == 0


def test_random_share_and_release_keeps_the_pool_consistent():
    rng = random.Random(7)
    pool = BlockPool(33, 4)
    held: list[list[int]] = []
    for step in range(2000):
        if held and (rng.random() < 0.5 or pool.num_free() == 0):
            pool.release(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, min(4, pool.num_free()))
            blocks = pool.allocate(n)
            if rng.random() < 0.5:
                pool.register(blocks[0], bytes([step % 251, step // 251]))
            held.append(blocks)
            if rng.random() < 0.3:
                pool.share(blocks)
                held.append(list(blocks))
        pool.check()
    for blocks in held:
        pool.release(blocks)
    pool.check()
    assert pool.num_free() == pool.usable
