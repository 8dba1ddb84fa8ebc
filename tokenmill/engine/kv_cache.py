"""KV cache block pool with prefix caching. Plain Python, no torch.

The model runner owns the KV tensors ``[num_blocks, block_size, H_kv, D]``; this module only
decides which block ids each request uses. The Scheduler is its one caller:

    Scheduler.schedule()        get_computed_blocks(req)  -> prefix hits of a waiting request
                                allocate_slots(req, n, hits) / allocate_slots(req, n)
    Scheduler (finish/abort/preempt)  free(req)
    ModelRunner (via ScheduledSeq.block_ids)  reads the block table, never changes it

Blocks are ints ``0..num_blocks-1`` with a reference count. Free blocks wait in an LRU queue:
allocation takes from the head, freeing appends to the tail. A *full* block of a request's
tokens is identified by a chained hash ``hash((parent_hash, tuple(tokens)))``; the map
``hash -> block id`` lets a later request with the same prefix reuse the block. A cached block
whose ref count drops to 0 stays in the free queue with its hash (still a hit candidate) until
allocation pops it for reuse, which evicts the hash.
"""

from __future__ import annotations

from collections import OrderedDict

from tokenmill.engine.request import Request

# Parent hash of a request's first block.
ROOT_HASH = None


def hash_block_tokens(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    """Hash of one full block, chained to its parent so equal blocks at different prefixes differ.

    NOTE: Python's tuple hash is fast and deterministic for ints but not collision resistant; a
    collision would make two different prefixes share KV. Swap in a cryptographic hash here if
    prompts from untrusted tenants must be isolated.
    """
    return hash((parent_hash, tokens))


class KVCacheManager:
    """Ref-counted block pool, per-request block tables and the prefix-cache hash map."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, "
                             f"got num_blocks={num_blocks}, block_size={block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks  # hash a block is cached under
        # Insertion order is LRU order; OrderedDict gives O(1) removal of a cached block on a hit.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[int, int] = {}       # block hash -> block id
        self.req_blocks: dict[str, list[int]] = {}    # request id -> block table
        self.num_hashed: dict[str, int] = {}          # request id -> leading blocks registered
        self.prefix_cache_queries = 0                 # cumulative tokens looked up
        self.prefix_cache_hits = 0                    # cumulative tokens found

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks held by no request (cached ones with ref count 0 included)."""
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (the live list; empty if it holds none)."""
        return self.req_blocks.get(request_id, [])

    def _caching_applies(self, request: Request) -> bool:
        # A request that wants prompt logprobs needs the logits of every prompt position, so
        # it must compute the whole prompt itself.
        return self.enable_caching and request.params.prompt_logprobs is None

    def update_block_hashes(self, request: Request) -> list[int]:
        """Extend ``request.block_hashes`` to cover every full block of ``all_token_ids``.

        Tokens are only ever appended, so hashes computed earlier stay valid (also across
        preemptions, which keep the output tokens).
        """
        hashes, bs, tokens = request.block_hashes, self.block_size, request.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[i - 1] if i else ROOT_HASH
            hashes.append(hash_block_tokens(parent, tuple(tokens[i * bs:(i + 1) * bs])))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest run of cached full blocks at the start of the request's tokens.

        Called by the Scheduler for a waiting request just before ``allocate_slots``. A pure
        query: it takes no references and counts no stats (``allocate_slots`` counts them when
        the hits are committed, so a request that waits several steps is counted once per
        admission). Returns ``(block_ids, num_computed_tokens)``.
        """
        if not self._caching_applies(request):
            return [], 0
        hashes = self.update_block_hashes(request)
        # NOTE: the last token is always recomputed: the step must produce its logits.
        max_hits = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in hashes[:max_hits]:
            block = self.cached_blocks.get(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    # ------------------------------------------------------------------ commands
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> list[int] | None:
        """Grow the request's block table to hold its computed tokens plus ``num_new_tokens``.

        Called by the Scheduler once per scheduled request per step. ``computed_blocks`` (from
        ``get_computed_blocks``; pass it, even empty, only when admitting a waiting request)
        are referenced and put first in the table. Returns the newly allocated block ids, or
        None, changing nothing, when too few blocks are free.
        """
        rid, bs = request.request_id, self.block_size
        hits = computed_blocks if computed_blocks is not None else []
        table = self.req_blocks.get(rid, [])
        assert not (hits and table), f"{rid}: prefix hits for a request that holds blocks"
        num_tokens = request.num_computed_tokens + len(hits) * bs + num_new_tokens
        num_new_blocks = max(0, -(-num_tokens // bs) - len(table) - len(hits))
        # Hit blocks with ref count 0 sit in the free queue: taking them shrinks it.
        num_free_hits = sum(1 for b in hits if self.ref_cnt[b] == 0)
        if num_new_blocks > len(self.free_blocks) - num_free_hits:
            return None

        if computed_blocks is not None and self._caching_applies(request):
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(hits) * bs
        for b in hits:
            if self.ref_cnt[b] == 0:
                del self.free_blocks[b]
            self.ref_cnt[b] += 1
        new_blocks = [self._pop_free_block() for _ in range(num_new_blocks)]
        table = self.req_blocks.setdefault(rid, table)
        table.extend(hits)
        table.extend(new_blocks)
        if self.enable_caching:
            self._cache_full_blocks(request, table, min(num_tokens, request.num_tokens) // bs)
        return new_blocks

    def _pop_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict: the block is about to hold other tokens
            self.block_hash[block] = None
            del self.cached_blocks[h]
        self.ref_cnt[block] = 1
        return block

    def _cache_full_blocks(self, request: Request, table: list[int], num_full: int) -> None:
        """Register the request's blocks ``[num_hashed, num_full)`` in the hash map.

        NOTE: this runs at allocation, before the step computes these tokens. That is safe
        because the step always runs and the attention writes every token's K/V before any
        query reads the cache, so a request hitting them later in the same step sees them.
        """
        rid = request.request_id
        start = self.num_hashed.get(rid, 0)
        if num_full <= start:
            return
        hashes = self.update_block_hashes(request)
        for i in range(start, num_full):
            block, h = table[i], hashes[i]
            if self.block_hash[block] == h:
                continue  # a prefix hit: already cached
            if h in self.cached_blocks:
                continue  # a duplicate computed concurrently: keep the first, leave this uncached
            self.block_hash[block] = h
            self.cached_blocks[h] = block
        self.num_hashed[rid] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references (on finish, abort or preemption).

        NOTE: blocks go to the free queue tail-first, so among a prefix's blocks the tail is
        evicted before the head (the head is the part most likely to be shared).
        """
        table = self.req_blocks.pop(request.request_id, [])
        self.num_hashed.pop(request.request_id, None)
        for block in reversed(table):
            self.ref_cnt[block] -= 1
            if self.ref_cnt[block] == 0:
                self.free_blocks[block] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only allowed while no request holds blocks."""
        if len(self.free_blocks) != self.num_blocks:
            return False
        self.cached_blocks.clear()
        self.block_hash = [None] * self.num_blocks
        return True

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Raise AssertionError naming what is inconsistent. Called by tests and debug runs."""
        free = self.free_blocks
        used = [b for b in range(self.num_blocks) if b not in free]
        assert len(free) + len(used) == self.num_blocks, \
            f"free {len(free)} + used {len(used)} != total {self.num_blocks}"
        bad = [(b, c) for b, c in enumerate(self.ref_cnt) if c < 0]
        assert not bad, f"negative ref counts (block, count): {bad}"
        bad = [b for b in free if self.ref_cnt[b] != 0]
        assert not bad, f"free blocks with ref count > 0: {bad}"
        bad = [b for b in used if self.ref_cnt[b] <= 0]
        assert not bad, f"used blocks (not in the free queue) with ref count 0: {bad}"
        refs = [0] * self.num_blocks
        for table in self.req_blocks.values():
            for b in table:
                refs[b] += 1
        assert refs == self.ref_cnt, f"ref counts {self.ref_cnt} != block-table refs {refs}"
        for h, b in self.cached_blocks.items():
            assert self.block_hash[b] == h, \
                f"hash map says {h} -> block {b}, which carries {self.block_hash[b]}"
        n_hashed = sum(h is not None for h in self.block_hash)
        assert n_hashed == len(self.cached_blocks), \
            f"{n_hashed} blocks carry a hash but the map has {len(self.cached_blocks)} entries"
