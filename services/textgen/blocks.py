"""The KV cache's block pool: fixed-size blocks, reference counts, and automatic prefix caching.

Torch-free bookkeeping (the tensors live in ``modeling.PagedKVCache``): a sequence holds a *block table*,
the list of block ids its positions live in (position p is slot ``p % block_size`` of block
``table[p // block_size]``). Block 0 is the null block: never handed out, kept at zeros, where padded
positions of a batch point, so a masked read never touches another sequence's data.

Prefix caching: a *full* block is named by a chain hash of its tokens and every token before it
(:func:`chain_hashes`), so two sequences with the same first k*block_size tokens have the same first k
hashes. A full block is registered under its hash once its keys and values are written; a later sequence
whose prompt starts with the same blocks takes them (reference count + 1) instead of computing them again.
A cached block nobody references stays cached until its memory is needed: free blocks are handed out
first, then cached ones, least recently released first (LRU), dropping their hash.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

NULL_BLOCK = 0


def chain_hashes(
    tokens: Sequence[int], block_size: int, *, limit: int | None = None, seed: bytes | None = None
) -> list[bytes]:
    """The hash of every full block of ``tokens[:limit]``: block i's hash covers tokens[0 : (i+1)*bs]
    (and ``seed``, which starts a chain of its own)."""
    n = len(tokens) if limit is None else min(limit, len(tokens))
    out: list[bytes] = []
    for start in range(0, n - block_size + 1, block_size):
        out.append(next_hash(out[-1] if out else seed, tokens[start : start + block_size]))
    return out


def next_hash(prev: bytes | None, block_tokens: Sequence[int]) -> bytes:
    """The chain hash of one more full block after the block hashed ``prev`` (None: the first block)."""
    h = hashlib.blake2b(prev or b"", digest_size=16)
    h.update(array("q", block_tokens).tobytes())
    return h.digest()


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens (block 0 reserved), with reference counts and the
    prefix cache. Counters: ``queries``/``hits`` (tokens looked up / found, as vLLM counts them)."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.queries = 0
        self.hits = 0
        self.evictions = 0

    # -- sizes -----------------------------------------------------------------------------------------
    @property
    def usable(self) -> int:
        """Blocks that can hold tokens (all but the null block)."""
        return self.num_blocks - 1

    def num_free(self) -> int:
        """Blocks that can be handed out now (free ones and cached ones nobody references)."""
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        """Fraction of usable blocks referenced by a sequence (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - self.num_free() / self.usable

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_cached(self) -> int:
        return len(self._by_hash)

    # -- allocation ------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """``n`` blocks with reference count 1, or ValueError (nothing taken) when fewer are free."""
        if n > self.num_free():
            raise ValueError(f"{n} blocks asked for, {self.num_free()} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(b)]
                self.evictions += 1
            self._ref[b] = 1
            out.append(b)
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """One more reference to each of ``blocks`` (a sequence that reuses them)."""
        for b in blocks:
            if self._ref[b] == 0:
                self._evictable.pop(b, None)
            self._ref[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of ``blocks``; a block nobody references becomes free (or, when it
        holds a cached prefix, evictable). Released in reverse so a sequence's tail is evicted first."""
        for b in reversed(blocks):
            if b == NULL_BLOCK:
                continue
            if self._ref[b] <= 0:
                raise RuntimeError(f"block {b} released more often than it was taken")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._ref[block]

    # -- prefix cache ----------------------------------------------------------------------------------
    def peek(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest cached prefix of ``hashes``, without taking them."""
        found: list[int] = []
        if self.prefix_caching:
            for h in hashes:
                b = self._by_hash.get(h)
                if b is None:
                    break
                found.append(b)
        return found

    def num_free_after(self, hit: Sequence[int]) -> int:
        """``num_free()`` once ``hit`` (cached blocks) are taken: the unreferenced ones stop being free."""
        return self.num_free() - sum(1 for b in hit if self._ref[b] == 0)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes`` that is cached, each taken once more
        (``share``); counts ``len(hashes) * block_size`` queried tokens and the hit ones."""
        found = self.peek(hashes)
        self.queries += len(hashes) * self.block_size
        self.hits += len(found) * self.block_size
        self.share(found)
        return found

    def register(self, block: int, h: bytes) -> None:
        """``block`` (full, written) holds the tokens hashed ``h``. When another block already holds them,
        the existing one stays the cached copy and ``block`` is freed as usual when released."""
        if not self.prefix_caching or block in self._hash_of or h in self._by_hash:
            return
        self._hash_of[block] = h
        self._by_hash[h] = block

    def check(self) -> None:
        """Internal consistency (tests): every usable block is exactly one of referenced, free, evictable."""
        free, ev = set(self._free), set(self._evictable)
        assert not free & ev and NULL_BLOCK not in free | ev
        for b in range(1, self.num_blocks):
            assert (self._ref[b] > 0) + (b in free) + (b in ev) == 1, b
        assert all(self._by_hash[h] == b for b, h in self._hash_of.items())
