"""Paged attention in plain PyTorch (CPU and CUDA).

Cache layout: one tensor per layer, ``[2 * H_kv, num_blocks, block_size, D]``; rows
``[0, H_kv)`` hold the K heads, ``[H_kv, 2 * H_kv)`` the V heads. Viewed as
``[2 * H_kv * num_blocks, block_size * D]`` ("cache rows"), one ``index_select`` along dim 0
gathers K and V of a list of blocks together, and what it returns is already head-major
(``[2, H_kv, n * block_size, D]``), the layout SDPA reads, so nothing is copied twice.

# NOTE: index_select along dim 0 is a plain row memcpy on CPU; advanced indexing
# (``cache[table]``) and index_select along an inner dim were 4-10x slower here (BENCHMARKS.md).

A step's query tokens are flattened into one batch of T tokens, decodes first (one token each),
then prefill chunks. Every token's K/V is written to its slot (``block_id * block_size +
offset``), then:

* decodes, on CPU with the native kernel (``cpu_kernels``), attend in place: one call reads
  each sequence's blocks through its block table, nothing is gathered; where that kernel is
  the AVX-512 bf16 one, prefill tokens join the same call, each a query row over its own
  causal prefix (faster than SDPA there; no gather, no mask);
* else decodes attend in groups: the runner orders them longest first and ``build_metadata``
  cuts them into groups of similar length, each gathered and attended on its own (padded to
  its longest member, a mask hiding the padding);
* each prefill chunk attends on its own: to the keys it just produced when it starts at
  position 0, else to its gathered context with an offset causal mask.

``AttentionMetadata`` is built once per step by ``build_metadata`` and shared by all layers.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tokenmill.worker import cpu_kernels

# One more decode group costs about as much as gathering and attending over this many padded
# blocks (an index_select and an SDPA call; measured on this CPU, see BENCHMARKS.md).
GROUP_COST_BLOCKS = 24


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """CPU zeros in fresh anonymous pages, which the kernel zero-fills when first touched:
    only the blocks a request writes cost anything. ``torch.zeros`` writes every page up
    front: 2.4 s for the demo model's 1.6 GB cache, most of its start-up."""
    buf = mmap.mmap(-1, math.prod(shape) * dtype.itemsize)
    return torch.frombuffer(buf, dtype=dtype).view(shape)   # the tensor keeps buf alive


@dataclass(frozen=True)
class KVCacheSpec:
    """Geometry of the paged cache (every layer alike)."""

    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    def allocate(self, num_layers: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
        shape = (2 * self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)
        # NOTE: zeros, not empty: masked-out padding slots still enter the attention matmul,
        # and 0 * NaN garbage would poison real rows.
        if torch.device(device).type == "cpu":
            return [_lazy_zeros(shape, dtype) for _ in range(num_layers)]
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def gather_rows(self, block_ids: torch.Tensor) -> torch.Tensor:
        """[n] block ids -> [2*H_kv*n] cache rows holding their K then V heads, head-major."""
        heads = torch.arange(2 * self.num_kv_heads, device=block_ids.device)
        return (heads[:, None] * self.num_blocks + block_ids[None, :]).flatten()


class SeqSpan(NamedTuple):
    """One sequence's part of a step: tokens [start_pos, start_pos + num_tokens)."""

    start_pos: int
    num_tokens: int
    block_ids: list[int]   # covering at least start_pos + num_tokens tokens


@dataclass
class DecodeGroup:
    row_start: int             # first row of the group in the flattened batch
    num_seqs: int
    gather: torch.Tensor       # [2*Hkv * num_seqs*width] cache rows, head-major (width:
                               # blocks per sequence, padded to the group's longest)
    mask: torch.Tensor | None  # [B, 1, 1, width*block_size] additive; None -> all visible


@dataclass
class PrefillChunk:
    query_start: int              # first row of this chunk in the flattened batch
    query_len: int
    start_pos: int                # position of the chunk's first token in its sequence
    gather: torch.Tensor | None   # cache rows of its blocks (start_pos > 0), else None
    mask: torch.Tensor | None     # [1, 1, query_len, ctx_len] additive; None -> plain causal


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                       # [T] int64
    num_decode_tokens: int = 0
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    # The native kernel's inputs instead of groups: [rows, max blocks] int32 block ids (padded
    # with 0) and [rows] int32 context lengths, for the decode rows or (native prefill) all.
    decode_table: torch.Tensor | None = None
    decode_lens: torch.Tensor | None = None
    sliding_window: int | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Metadata (once per step)


def causal_mask(query_len: int, start_pos: int, ctx_len: int, sliding_window: int | None,
                device) -> torch.Tensor:
    """[1, 1, q, ctx] bool: query i (at position start_pos+i) sees key j iff j <= start_pos+i
    and, with a sliding window, start_pos+i - j < window."""
    q_pos = torch.arange(start_pos, start_pos + query_len, device=device)[:, None]
    k_pos = torch.arange(ctx_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    return mask[None, None]


def decode_mask(seq_lens: list[int] | torch.Tensor, width: int, sliding_window: int | None,
                device) -> torch.Tensor:
    """[B, 1, 1, width] bool: a decode token at position L-1 sees keys [0, L) (within window).
    ``seq_lens`` may already be a tensor on ``device`` (a CUDA graph's input)."""
    lens = torch.as_tensor(seq_lens, device=device)[:, None]
    k_pos = torch.arange(width, device=device)[None, :]
    mask = k_pos < lens
    if sliding_window is not None:
        mask &= (lens - 1 - k_pos) < sliding_window
    return mask[:, None, None, :]


def group_decodes(widths: list[int]) -> list[tuple[int, int]]:
    """Cut consecutive decodes into groups [(start, end)] minimizing the padded work.

    Cost of a group = GROUP_COST_BLOCKS + num_seqs * max width. Exact DP over runs of equal
    width (few when the runner sorts by length, so this stays cheap in Python).
    """
    runs: list[tuple[int, int, int]] = []   # (first index, width, count)
    for i, w in enumerate(widths):
        if runs and runs[-1][1] == w:
            runs[-1] = (runs[-1][0], w, runs[-1][2] + 1)
        else:
            runs.append((i, w, 1))
    best, cut = [0.0] + [math.inf] * len(runs), [0] * (len(runs) + 1)
    for j in range(1, len(runs) + 1):
        count = wmax = 0
        for i in range(j - 1, -1, -1):
            count += runs[i][2]
            wmax = max(wmax, runs[i][1])
            cost = best[i] + GROUP_COST_BLOCKS + count * wmax
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(runs)
    while j > 0:
        i = cut[j]
        groups.append((runs[i][0], runs[j - 1][0] + runs[j - 1][2]))
        j = i
    return groups[::-1]


def build_metadata(spans: list[SeqSpan], spec: KVCacheSpec, sliding_window: int | None,
                   device, native_decode: bool = False, native_prefill: bool = False,
                   mask_dtype: torch.dtype = torch.float32) -> AttentionMetadata:
    """Metadata for a step whose rows are ``spans`` in order: decodes (one token) first.

    ``mask_dtype``: of the additive masks; off the CPU it must be the query's dtype (see
    ``additive_mask``).

    ``native_decode``: decodes go to the native kernel (block tables); else they are grouped
    as they come, so put them longest first for the least padding. ``native_prefill`` (with
    ``native_decode``): every row goes to it, a prompt token as a query over its prefix.
    """
    bs = spec.block_size
    slots: list[int] = []
    for s in spans:
        blocks = s.block_ids
        slots.extend(blocks[p // bs] * bs + p % bs
                     for p in range(s.start_pos, s.start_pos + s.num_tokens))
    nd = 0
    while nd < len(spans) and spans[nd].num_tokens == 1:
        nd += 1
    meta = AttentionMetadata(slot_mapping=_long(slots, device), num_decode_tokens=nd,
                             sliding_window=sliding_window)

    if native_decode and native_prefill and nd < len(spans):
        _native_rows(meta, spans, bs, device)
        return meta
    lens = [s.start_pos + 1 for s in spans[:nd]]
    widths = [-(-n // bs) for n in lens]   # blocks each decode reads
    if nd and native_decode:
        width = max(widths)
        table = [s.block_ids[:w] + [0] * (width - w) for s, w in zip(spans[:nd], widths)]
        meta.decode_table = torch.tensor(table, dtype=torch.int32, device=device)
        meta.decode_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    elif nd:
        for a, b in group_decodes(widths):
            width = max(widths[a:b])
            mask = None
            if sliding_window is not None or any(n != width * bs for n in lens[a:b]):
                mask = additive_mask(
                    decode_mask(lens[a:b], width * bs, sliding_window, device), mask_dtype)
            table: list[int] = []
            for s, w in zip(spans[a:b], widths[a:b]):
                table.extend(s.block_ids[:w])
                table.extend([0] * (width - w))   # padding: block 0, masked out
            meta.decode_groups.append(
                DecodeGroup(a, b - a, spec.gather_rows(_long(table, device)), mask))

    row = nd
    for s in spans[nd:]:
        ctx = s.start_pos + s.num_tokens
        gather = mask = None
        if s.start_pos > 0:
            gather = spec.gather_rows(_long(s.block_ids[:-(-ctx // bs)], device))
        if s.start_pos > 0 or (sliding_window is not None and ctx > sliding_window):
            mask = additive_mask(
                causal_mask(s.num_tokens, s.start_pos, ctx, sliding_window, device), mask_dtype)
        meta.prefills.append(PrefillChunk(row, s.num_tokens, s.start_pos, gather, mask))
        row += s.num_tokens
    return meta


def _native_rows(meta: AttentionMetadata, spans: list[SeqSpan], bs: int, device) -> None:
    """Every row a query of the native kernel: token i of a span sees its first
    start_pos + i + 1 positions, through its sequence's block table (one row per token)."""
    lens: list[int] = []
    for s in spans:
        lens.extend(range(s.start_pos + 1, s.start_pos + s.num_tokens + 1))
    widths = [-(-(s.start_pos + s.num_tokens) // bs) for s in spans]
    width = max(widths)
    table = torch.tensor([s.block_ids[:w] + [0] * (width - w) for s, w in zip(spans, widths)],
                         dtype=torch.int32, device=device)
    counts = torch.tensor([s.num_tokens for s in spans], device=device)
    meta.decode_table = table.repeat_interleave(counts, dim=0)
    meta.decode_lens = torch.tensor(lens, dtype=torch.int32, device=device)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # NOTE: SDPA turns a bool mask into an additive one on every call (8 layers x groups);
    # once per step here is cheaper. float32 was the fastest mask dtype with bf16 q on CPU.
    # On an H100/H200, SDPA's default cuDNN backend reads a float32 mask given with bf16 q as
    # bf16 (pytorch/pytorch#191612): silently wrong attention. There the mask is q's dtype.
    return torch.zeros(visible.shape, dtype=dtype,
                       device=visible.device).masked_fill_(~visible, -math.inf)


def _long(data: list[int], device) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------
# The attention op (once per layer)


def paged_attention(
    q: torch.Tensor,         # [T, H, D]
    k: torch.Tensor,         # [T, Hkv, D]
    v: torch.Tensor,         # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2*Hkv, num_blocks, block_size, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:           # [T, H, D]
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    dtype = kv_cache.dtype
    by_slot = kv_cache.view(2, num_kv_heads, -1, head_dim)      # [2, Hkv, N*bs, D]
    # NOTE: write before reading, so each token sees its own K/V through the gathered cache.
    by_slot[0].index_copy_(1, meta.slot_mapping, k.transpose(0, 1).to(dtype))
    by_slot[1].index_copy_(1, meta.slot_mapping, v.transpose(0, 1).to(dtype))
    rows = kv_cache.view(-1, kv_cache.shape[2] * head_dim)      # [2*Hkv*N, bs*D]
    gqa = q.shape[1] != num_kv_heads
    out = torch.empty_like(q)
    if meta.decode_table is not None:
        n = meta.decode_table.shape[0]   # the decodes, or every row (native prefill)
        cpu_kernels.decode_attention(q[:n], kv_cache, meta.decode_table, meta.decode_lens,
                                     scale, meta.sliding_window, out[:n])

    for grp in meta.decode_groups:
        kv = rows.index_select(0, grp.gather).view(2, num_kv_heads, grp.num_seqs, -1, head_dim)
        kv = kv.to(q.dtype)                                     # [2, Hkv, B, S, D]
        sel = slice(grp.row_start, grp.row_start + grp.num_seqs)
        od = F.scaled_dot_product_attention(
            q[sel].unsqueeze(2),                                # [B, H, 1, D]
            kv[0].transpose(0, 1), kv[1].transpose(0, 1),       # [B, Hkv, S, D]
            attn_mask=grp.mask, scale=scale, enable_gqa=gqa)
        out[sel] = od.squeeze(2)

    for p in meta.prefills:
        sel = slice(p.query_start, p.query_start + p.query_len)
        qp = q[sel].transpose(0, 1).unsqueeze(0)                # [1, H, q, D]
        if p.gather is None:
            kp = k[sel].transpose(0, 1).unsqueeze(0)            # [1, Hkv, q, D]
            vp = v[sel].transpose(0, 1).unsqueeze(0)
        else:
            ctx = p.start_pos + p.query_len
            g = rows.index_select(0, p.gather).view(2, 1, num_kv_heads, -1, head_dim)
            g = g[..., :ctx, :].to(q.dtype)                     # [2, 1, Hkv, ctx, D]
            kp, vp = g[0], g[1]
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask,
                                            is_causal=p.mask is None, scale=scale,
                                            enable_gqa=gqa)
        out[sel] = op.squeeze(0).transpose(0, 1)
    return out
