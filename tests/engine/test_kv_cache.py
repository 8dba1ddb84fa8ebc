"""KVCacheManager: exact block ids, free-queue order, prefix hits, eviction, invariants."""

import pytest

from tokenmill.engine.kv_cache import ROOT_HASH, KVCacheManager, hash_block_tokens
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams


@pytest.fixture
def make_kv():
    """Build managers; after the test each one must be consistent and hold nothing."""
    made = []

    def make(num_blocks=8, block_size=4, enable_caching=True):
        kv = KVCacheManager(num_blocks, block_size, enable_caching)
        made.append(kv)
        return kv

    yield make
    for kv in made:
        kv.check_invariants()
        assert kv.num_free_blocks == kv.num_blocks, "blocks still held at the end of the test"
        assert not kv.req_blocks


def req(rid, tokens, **params):
    return Request(rid, list(tokens), SamplingParams(**params))


def admit(kv, r):
    """What the scheduler does for a waiting request: look up hits, allocate the rest."""
    hits, num_hit = kv.get_computed_blocks(r)
    new = kv.allocate_slots(r, r.num_tokens - num_hit, hits)
    if new is not None:
        r.num_computed_tokens = r.num_tokens
    return hits, new


def free_order(kv):
    return list(kv.free_blocks)


def test_first_allocation_and_free_order(make_kv):
    kv = make_kv()
    r = req("a", range(10))
    assert kv.get_computed_blocks(r) == ([], 0)
    assert kv.allocate_slots(r, 10, []) == [0, 1, 2]
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.num_free_blocks == 5 and kv.usage == 3 / 8
    assert free_order(kv) == [3, 4, 5, 6, 7]
    # The two full blocks are cached; the partial third is not.
    assert len(r.block_hashes) == 2
    assert kv.cached_blocks == {r.block_hashes[0]: 0, r.block_hashes[1]: 1}
    kv.check_invariants()
    kv.free(r)
    # Freed tail-first onto the tail of the queue.
    assert free_order(kv) == [3, 4, 5, 6, 7, 2, 1, 0]
    assert kv.get_block_ids("a") == [] and kv.usage == 0.0
    # Cached blocks keep their hash while free.
    assert kv.cached_blocks == {r.block_hashes[0]: 0, r.block_hashes[1]: 1}


def test_block_hashes_are_chained(make_kv):
    kv = make_kv()
    r = req("a", range(9))
    kv.update_block_hashes(r)
    h0 = hash_block_tokens(ROOT_HASH, (0, 1, 2, 3))
    h1 = hash_block_tokens(h0, (4, 5, 6, 7))
    assert r.block_hashes == [h0, h1]
    # Same tokens under a different parent hash differently.
    assert hash_block_tokens(ROOT_HASH, (4, 5, 6, 7)) != h1
    r.append_output_token(99)
    r.append_output_token(98)
    r.append_output_token(97)
    kv.update_block_hashes(r)
    assert r.block_hashes[2] == hash_block_tokens(h1, (8, 99, 98, 97))


def test_prefix_hit_shares_blocks_and_counts_stats(make_kv):
    kv = make_kv()
    a = req("a", range(10))
    admit(kv, a)
    b = req("b", [*range(8), 100, 101, 102])
    hits, new = admit(kv, b)
    assert hits == [0, 1] and new == [3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert kv.ref_cnt[:4] == [2, 2, 1, 1]
    assert kv.prefix_cache_queries == 10 + 11 and kv.prefix_cache_hits == 8
    kv.check_invariants()
    kv.free(a)
    assert free_order(kv) == [4, 5, 6, 7, 2]   # 0 and 1 are still held by b
    kv.free(b)
    assert free_order(kv) == [4, 5, 6, 7, 2, 3, 1, 0]


def test_hit_on_free_cached_blocks_takes_them_out_of_the_queue(make_kv):
    kv = make_kv()
    a = req("a", range(10))
    admit(kv, a)
    kv.free(a)
    b = req("b", range(12))
    hits, new = admit(kv, b)
    assert hits == [0, 1] and new == [3]
    assert free_order(kv) == [4, 5, 6, 7, 2]
    kv.free(b)
    assert free_order(kv) == [4, 5, 6, 7, 2, 3, 1, 0]


def test_get_computed_blocks_is_a_query(make_kv):
    kv = make_kv()
    a = req("a", range(10))
    admit(kv, a)
    kv.free(a)
    b = req("b", range(10))
    before = (free_order(kv), list(kv.ref_cnt), kv.prefix_cache_queries, kv.prefix_cache_hits)
    assert kv.get_computed_blocks(b) == ([0, 1], 8)
    assert kv.get_computed_blocks(b) == ([0, 1], 8)
    assert (free_order(kv), list(kv.ref_cnt), kv.prefix_cache_queries,
            kv.prefix_cache_hits) == before


def test_last_token_is_always_computed(make_kv):
    kv = make_kv()
    a = req("a", range(8))           # exactly two full blocks
    admit(kv, a)
    b = req("b", range(8))
    hits, new = admit(kv, b)
    assert hits == [0] and new == [2]
    assert kv.prefix_cache_hits == 4
    # One more token makes the second block hittable.
    c = req("c", range(9))
    hits, new = admit(kv, c)
    assert hits == [0, 1] and new == [3]
    for r in (a, b, c):
        kv.free(r)


def test_prompt_logprobs_requests_get_no_hits(make_kv):
    kv = make_kv()
    a = req("a", range(10))
    admit(kv, a)
    queries, hits_before = kv.prefix_cache_queries, kv.prefix_cache_hits
    b = req("b", range(10), prompt_logprobs=1)
    hits, new = admit(kv, b)
    assert hits == [] and new == [3, 4, 5]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (queries, hits_before)
    # Its full blocks duplicate a's, so they are not registered.
    assert kv.cached_blocks == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}
    kv.free(a)
    kv.free(b)


def test_caching_disabled(make_kv):
    kv = make_kv(enable_caching=False)
    a = req("a", range(10))
    admit(kv, a)
    kv.free(a)
    b = req("b", range(10))
    hits, new = admit(kv, b)
    assert hits == [] and new == [3, 4, 5]
    assert kv.cached_blocks == {} and kv.prefix_cache_queries == 0
    kv.free(b)


def test_lru_evicts_least_recently_freed_first(make_kv):
    kv = make_kv(num_blocks=4)
    a, b = req("a", range(5)), req("b", range(100, 105))
    admit(kv, a)                      # [0, 1]
    admit(kv, b)                      # [2, 3]
    kv.free(a)
    kv.free(b)
    assert free_order(kv) == [1, 0, 3, 2]
    c = req("c", range(200, 205))
    admit(kv, c)                      # takes 1 (uncached) and 0 (a's cached head)
    assert kv.get_block_ids("c") == [1, 0]
    assert kv.get_computed_blocks(req("x", range(5))) == ([], 0)     # a evicted
    assert kv.get_computed_blocks(req("y", range(100, 105))) == ([2], 4)  # b kept
    kv.free(c)


def test_tail_of_prefix_is_evicted_before_head(make_kv):
    kv = make_kv()
    a = req("a", range(12))           # three full blocks
    admit(kv, a)
    kv.free(a)
    assert free_order(kv) == [3, 4, 5, 6, 7, 2, 1, 0]
    b = req("b", range(100, 124))     # six blocks: the five uncached ones, then a's tail
    assert admit(kv, b) == ([], [3, 4, 5, 6, 7, 2])
    assert free_order(kv) == [1, 0]
    # a's head blocks survived; its tail block 2 was evicted (13 tokens could hit 3 blocks).
    assert kv.get_computed_blocks(req("c", range(13))) == ([0, 1], 8)
    kv.free(b)


def test_duplicate_blocks_keep_the_first(make_kv):
    kv = make_kv()
    a, b = req("a", range(9)), req("b", range(9))
    # Both looked up before either is allocated: they compute the same blocks concurrently.
    hits_a, _ = kv.get_computed_blocks(a)
    hits_b, _ = kv.get_computed_blocks(b)
    assert kv.allocate_slots(a, 9, hits_a) == [0, 1, 2]
    assert kv.allocate_slots(b, 9, hits_b) == [3, 4, 5]
    assert kv.cached_blocks == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}
    assert kv.block_hash[3] is None and kv.block_hash[4] is None
    kv.check_invariants()
    kv.free(a)
    kv.free(b)
    assert free_order(kv) == [6, 7, 2, 1, 0, 5, 4, 3]
    c = req("c", range(9))
    assert admit(kv, c) == ([0, 1], [6])
    kv.free(c)


def test_allocation_failure_changes_nothing(make_kv):
    kv = make_kv(num_blocks=4)
    a = req("a", range(9))
    admit(kv, a)                      # [0, 1, 2]
    kv.free(a)                        # queue [3, 2, 1, 0]; 0 and 1 cached
    b = req("b", [*range(8), *range(50, 59)])   # 17 tokens: 2 hits + 3 new > 4 - 2 free
    hits, num_hit = kv.get_computed_blocks(b)
    assert (hits, num_hit) == ([0, 1], 8)

    def snapshot():
        return (free_order(kv), list(kv.ref_cnt), dict(kv.cached_blocks), list(kv.block_hash),
                {k: list(v) for k, v in kv.req_blocks.items()}, kv.prefix_cache_queries,
                kv.prefix_cache_hits)

    before = snapshot()
    assert kv.allocate_slots(b, 9, hits) is None
    assert snapshot() == before
    # One token fewer fits exactly: the two hits leave the queue and the other two are popped.
    c = req("c", [*range(8), *range(50, 58)])
    assert admit(kv, c) == ([0, 1], [3, 2])
    assert kv.num_free_blocks == 0
    before = snapshot()
    c.append_output_token(7)
    assert kv.allocate_slots(c, 1) is None
    assert snapshot() == before
    kv.free(c)


def test_decode_growth_registers_blocks_when_full(make_kv):
    kv = make_kv()
    r = req("a", range(7))
    assert kv.allocate_slots(r, 7, []) == [0, 1]
    r.num_computed_tokens = 7
    assert list(kv.cached_blocks.values()) == [0]
    r.append_output_token(50)         # 8 tokens: the step computes position 7, filling block 1
    assert kv.allocate_slots(r, 1) == []
    r.num_computed_tokens = 8
    assert sorted(kv.cached_blocks.values()) == [0, 1]
    r.append_output_token(51)         # position 8 needs a third block
    assert kv.allocate_slots(r, 1) == [2]
    assert kv.get_block_ids("a") == [0, 1, 2]
    kv.free(r)


def test_reset_prefix_cache(make_kv):
    kv = make_kv()
    a = req("a", range(10))
    admit(kv, a)
    assert kv.reset_prefix_cache() is False
    assert len(kv.cached_blocks) == 2
    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.cached_blocks == {} and kv.block_hash == [None] * 8
    assert kv.get_computed_blocks(req("b", range(10))) == ([], 0)


def test_check_invariants_catches_corruption(make_kv):
    kv = make_kv()
    a = req("a", range(10))
    admit(kv, a)
    kv.ref_cnt[0] += 1
    with pytest.raises(AssertionError, match="ref counts"):
        kv.check_invariants()
    kv.ref_cnt[0] -= 1
    kv.free_blocks[1] = None          # a held block in the free queue
    with pytest.raises(AssertionError, match="free blocks with ref count"):
        kv.check_invariants()
    del kv.free_blocks[1]
    kv.block_hash[5] = 12345          # a hash the map does not know
    with pytest.raises(AssertionError, match="carry a hash"):
        kv.check_invariants()
    kv.block_hash[5] = None
    kv.free(a)


def test_constructor_validates():
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(0, 4)
