"""Paged attention in plain PyTorch (CPU and CUDA).

The KV cache of one layer is a pair of tensors ``[num_blocks, block_size, H_kv, D]``. A step's
query tokens are flattened into one batch of ``T`` tokens, decodes first (one token each), then
prefill chunks. Every token's K/V is written to its slot (``block_id * block_size + offset``),
then:

* decodes attend as one padded batch: their block tables gather ``[B, max_blocks*block_size]``
  keys, and a boolean mask hides the padding;
* each prefill chunk attends on its own: to the keys it just produced (a plain causal mask) when
  it starts at position 0, else to its gathered context with an offset causal mask.

``AttentionMetadata`` is built once per step by the model runner and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    query_start: int           # first row of this chunk in the flattened batch
    query_len: int
    start_pos: int             # position of the chunk's first token in its sequence
    block_table: torch.Tensor  # [n_blocks] int64, covering start_pos + query_len tokens
    mask: torch.Tensor | None  # [1, 1, query_len, ctx_len] bool; None -> plain causal on own K/V


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                  # [T] int64
    num_decode_tokens: int = 0
    decode_block_table: torch.Tensor | None = None  # [B_d, max_blocks] int64 (padded with 0)
    decode_mask: torch.Tensor | None = None         # [B_d, 1, 1, max_blocks*block_size] bool
    prefills: list[PrefillChunk] = field(default_factory=list)


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


def decode_mask(seq_lens: list[int], width: int, sliding_window: int | None,
                device) -> torch.Tensor:
    """[B, 1, 1, width] bool: a decode token at position L-1 sees keys [0, L) (within window)."""
    lens = torch.tensor(seq_lens, device=device)[:, None]
    k_pos = torch.arange(width, device=device)[None, :]
    mask = k_pos < lens
    if sliding_window is not None:
        mask &= (lens - 1 - k_pos) < sliding_window
    return mask[:, None, None, :]


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    # cache: [N, bs, Hkv, D]; block_table: [..., nb] -> [..., nb*bs, Hkv, D]
    g = cache[block_table]
    return g.flatten(-4, -3)


def paged_attention(
    q: torch.Tensor,        # [T, H, D]
    k: torch.Tensor,        # [T, Hkv, D]
    v: torch.Tensor,        # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:          # [T, H, D]
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    # NOTE: write before reading, so each token sees its own K/V through the gathered cache.
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    gqa = q.shape[1] != num_kv_heads
    out = torch.empty_like(q)

    nd = meta.num_decode_tokens
    if nd:
        qd = q[:nd].unsqueeze(2)                                        # [B, H, 1, D]
        kd = _gather(k_cache, meta.decode_block_table).transpose(1, 2)  # [B, Hkv, S, D]
        vd = _gather(v_cache, meta.decode_block_table).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd.to(q.dtype), vd.to(q.dtype),
                                            attn_mask=meta.decode_mask, scale=scale,
                                            enable_gqa=gqa)
        out[:nd] = od.squeeze(2)

    for p in meta.prefills:
        rows = slice(p.query_start, p.query_start + p.query_len)
        qp = q[rows].transpose(0, 1).unsqueeze(0)                       # [1, H, q, D]
        if p.mask is None:
            kp = k[rows].transpose(0, 1).unsqueeze(0)                   # [1, Hkv, q, D]
            vp = v[rows].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                                enable_gqa=gqa)
        else:
            ctx = p.start_pos + p.query_len
            kp = _gather(k_cache, p.block_table)[:ctx].transpose(0, 1).unsqueeze(0).to(q.dtype)
            vp = _gather(v_cache, p.block_table)[:ctx].transpose(0, 1).unsqueeze(0).to(q.dtype)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale,
                                                enable_gqa=gqa)
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
