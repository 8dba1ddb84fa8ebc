"""Paged attention against dense attention on the same keys: decodes split into several
length groups, prefill chunks with and without cached context, sliding windows; and the
decode grouping's cost model."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tokenmill.worker.attention import (GROUP_COST_BLOCKS, KVCacheSpec, SeqSpan, build_metadata,
                                        group_decodes, paged_attention)

H, HKV, D, BS, NUM_BLOCKS = 4, 2, 8, 4, 256


def dense(q, k, v, q_pos, window=None):
    """Reference: q [n, H, D] at positions q_pos attend to k, v [ctx, Hkv, D] causally."""
    k_pos = torch.arange(k.shape[0])[None, :]
    mask = k_pos <= torch.tensor(q_pos)[:, None]
    if window is not None:
        mask &= (torch.tensor(q_pos)[:, None] - k_pos) < window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=D ** -0.5, enable_gqa=True)
    return out.transpose(0, 1)   # [n, H, D]


def run_step(spans, window=None, seed=0):
    """Scatter each sequence's full K/V history over random blocks, run one step of ``spans``
    (history before each span already in the cache), compare every row with dense attention."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    spec = KVCacheSpec(NUM_BLOCKS, BS, HKV, D)
    cache = spec.allocate(1, torch.float32, "cpu")[0]
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    seqs, step_spans = [], []
    for start, num in spans:
        ctx = start + num
        blocks = [free.pop() for _ in range(-(-ctx // BS))]
        k, v = torch.randn(ctx, HKV, D, generator=gen), torch.randn(ctx, HKV, D, generator=gen)
        if start:   # history: write it as an earlier step would have
            hist = build_metadata([SeqSpan(0, start, blocks)], spec, window, "cpu")
            paged_attention(torch.randn(start, H, D), k[:start], v[:start], cache, hist, 1.0)
        seqs.append((start, num, k, v))
        step_spans.append(SeqSpan(start, num, blocks))
    meta = build_metadata(step_spans, spec, window, "cpu")
    q = torch.randn(sum(n for _, n in spans), H, D, generator=gen)
    k_new = torch.cat([k[s:s + n] for s, n, k, _ in seqs])
    v_new = torch.cat([v[s:s + n] for s, n, _, v in seqs])
    out = paged_attention(q, k_new, v_new, cache, meta, D ** -0.5)
    row = 0
    for start, num, k, v in seqs:
        ref = dense(q[row:row + num], k, v, list(range(start, start + num)), window)
        torch.testing.assert_close(out[row:row + num], ref, atol=1e-5, rtol=1e-5)
        row += num
    return meta


def test_decodes_in_several_groups_match_dense():
    # Longest first, as the runner orders them; widths 32..1 blocks force several groups.
    lens = [127, 120, 101, 64, 63, 40, 17, 9, 5, 4, 1]
    meta = run_step([(n - 1, 1) for n in lens])
    assert len(meta.decode_groups) > 1
    assert sum(g.num_seqs for g in meta.decode_groups) == len(lens)


def test_unsorted_decodes_and_prefills_in_one_step_match_dense():
    meta = run_step([(3, 1), (40, 1), (0, 1), (17, 1), (0, 9), (12, 7), (30, 3)])
    assert meta.num_decode_tokens == 4
    assert [p.gather is None for p in meta.prefills] == [True, False, False]


def test_sliding_window_decode_and_chunk_match_dense():
    run_step([(50, 1), (20, 1), (0, 30), (33, 5)], window=8)


def test_group_decodes_cost_model():
    # Equal widths: one group.
    assert group_decodes([4, 4, 4]) == [(0, 3)]
    # A very long one among short ones is split off once the saving exceeds a group's cost.
    big = GROUP_COST_BLOCKS + 10
    assert group_decodes([big, 1, 1, 1, 1]) == [(0, 1), (1, 5)]
    assert group_decodes([3, 2, 1]) == [(0, 3)]
    # Groups always cover every decode, in order.
    widths = sorted((random.Random(1).randint(1, 40) for _ in range(100)), reverse=True)
    groups = group_decodes(widths)
    assert groups[0][0] == 0 and groups[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))


@pytest.mark.parametrize("lens", [[1], [16], [17, 16, 1]])
def test_block_boundaries(lens):
    run_step([(n - 1, 1) for n in lens])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_cache_starts_zeroed_and_layers_do_not_share_memory(dtype):
    """The CPU cache comes from lazily zero-filled pages: it must still read as zeros (padding
    slots enter the attention matmul), be writable, and give each layer its own storage."""
    spec = KVCacheSpec(num_blocks=300, block_size=16, num_kv_heads=2, head_dim=64)
    caches = spec.allocate(3, dtype, "cpu")
    assert all(c.shape == (4, 300, 16, 64) and c.dtype == dtype and c.is_contiguous()
               for c in caches)
    assert all(not c.any() for c in caches)
    caches[1][3, 299] = 1.5
    assert caches[1].sum().item() == 1.5 * 16 * 64
    assert not caches[0].any() and not caches[2].any()


def test_masks_take_the_requested_dtype_with_the_same_pattern():
    """Off the CPU the runner asks for masks in the query's dtype: on an H100/H200, SDPA's
    default cuDNN backend reads a float32 mask given with bf16 queries as bf16 (wrong output,
    no error). The pattern of 0 and -inf must not change with the dtype."""
    spec = KVCacheSpec(NUM_BLOCKS, BS, HKV, D)
    spans = [SeqSpan(6, 1, [0, 1]), SeqSpan(2, 1, [2]), SeqSpan(5, 3, [3, 4])]
    metas = {dt: build_metadata(spans, spec, 3, "cpu", mask_dtype=dt)
             for dt in (torch.float32, torch.bfloat16)}
    masks = {dt: [g.mask for g in m.decode_groups] + [p.mask for p in m.prefills]
             for dt, m in metas.items()}
    assert all(m is not None for m in masks[torch.float32])
    assert all(m.dtype == torch.bfloat16 for m in masks[torch.bfloat16])
    for a, b in zip(masks[torch.float32], masks[torch.bfloat16]):
        assert a.dtype == torch.float32 and torch.equal(a, b.float())
