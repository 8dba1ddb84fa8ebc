"""CUDA graphs for decode-only steps on a GPU.

A small model's decode step on a GPU is bound by launching kernels, not by running them: on
an H200, eager PyTorch took 12 ms a step at batch 32 for a 0.5B model whose weights take
0.2 ms to read (BENCHMARKS.md). A CUDA graph records every kernel of the step once and
replays them with one launch.

A graph has fixed shapes, so a step is padded to a bucket: ``B`` rows (a power of two) and
``W`` blocks of context per row (a power of two). Each (B, W) is captured the first time a
step needs it. Its inputs live in one static int64 buffer that a step fills with one copy:
token ids, positions, KV slots, context lengths and the [B, W] block table. The attention
mask and the cache rows to gather are computed inside the graph from those.

Padded rows and padded blocks point at a scratch block that no request owns. Padded rows write
their K/V there; padded blocks are gathered from there and masked out.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from tokenmill.worker.attention import (AttentionMetadata, DecodeGroup, KVCacheSpec,
                                        additive_mask, decode_mask)

logger = logging.getLogger(__name__)

# A bucket gathers [2, Hkv, B, W * block_size, D] of K/V per layer into the graphs' private
# pool, which holds its peak for good: past this many bytes a step runs eagerly. (The KV cache
# leaves a tenth of the GPU's free memory, see ``model_runner``.)
MAX_GATHER_BYTES = 1 << 30


def bucket(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


class _Graph:
    def __init__(self, rows: int, width: int, device):
        self.rows, self.width = rows, width
        # ids | positions | slots | lens | table[rows * width]
        self.inputs = torch.zeros(4 * rows + rows * width, dtype=torch.long, device=device)
        self.graph = None          # the torch.cuda.CUDAGraph, once captured
        self.output: torch.Tensor | None = None

    def views(self):
        b = self.rows
        x = self.inputs
        return x[:b], x[b:2 * b], x[2 * b:3 * b], x[3 * b:4 * b], x[4 * b:]


class DecodeGraphs:
    """Runs decode-only steps of ``model`` through captured graphs; see the module docstring."""

    def __init__(self, model, kv_caches: list[torch.Tensor], spec: KVCacheSpec,
                 scratch_block: int, dtype: torch.dtype, sliding_window: int | None,
                 max_rows: int, max_blocks: int):
        self.model, self.kv_caches, self.spec = model, kv_caches, spec
        self.scratch = scratch_block
        self.dtype, self.sliding_window = dtype, sliding_window
        self.max_rows, self.max_blocks = bucket(max_rows), bucket(max_blocks)
        self.device = kv_caches[0].device
        self.pool = None           # made at the first capture (this class is tested on CPU)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.failed = False        # a capture failed other than for memory: graphs are off
        self.max_cells: int | None = None   # rows * width from which captures ran out of memory
        elem = kv_caches[0].element_size()
        self.bytes_per_cell = 2 * spec.num_kv_heads * spec.block_size * spec.head_dim * elem

    def shape_for(self, num_rows: int, max_blocks: int) -> tuple[int, int] | None:
        """The (B, W) bucket of a decode step, or None where it runs eagerly."""
        if self.failed or num_rows > self.max_rows or max_blocks > self.max_blocks:
            return None
        rows, width = bucket(num_rows), bucket(max_blocks)
        if rows * width * self.bytes_per_cell > MAX_GATHER_BYTES:
            return None
        if self.max_cells is not None and rows * width >= self.max_cells:
            return None
        return rows, width

    def run(self, shape: tuple[int, int], ids: list[int], positions: list[int],
            block_tables: list[list[int]]) -> torch.Tensor | None:
        """Hidden states [n, hidden] of the step's n rows, or None if this bucket cannot be
        captured. They live in the graphs' shared pool, where the next replay of any graph
        may overwrite them: use them before that (``execute`` does, within its step)."""
        g = self.graphs.get(shape)
        if g is None:
            g = self._capture(*shape)
            if g is None:
                return None
        self.fill(g, ids, positions, block_tables)
        g.graph.replay()
        return g.output[:len(ids)]

    def fill(self, g: _Graph, ids: list[int], positions: list[int],
             block_tables: list[list[int]]) -> None:
        """Write a step's rows into ``g``'s inputs, padded to its shape with the scratch block."""
        bs, n, b, width = self.spec.block_size, len(ids), g.rows, g.width
        host = np.zeros(g.inputs.shape[0], dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int64)
        host[:n] = ids
        host[b:b + n] = pos
        host[2 * b:3 * b] = self.scratch * bs           # padded rows write to scratch
        host[2 * b:2 * b + n] = [t[p // bs] * bs + p % bs for t, p in zip(block_tables, pos)]
        host[3 * b:4 * b] = 1
        host[3 * b:3 * b + n] = pos + 1
        table = host[4 * b:].reshape(b, width)
        table[:] = self.scratch                         # padded blocks: scratch, masked out
        for row, t in zip(table, block_tables):
            m = min(len(t), width)
            row[:m] = t[:m]
        g.inputs.copy_(torch.from_numpy(host))

    # ------------------------------------------------------------------ capture
    def forward(self, g: _Graph) -> torch.Tensor:
        """The model on ``g``'s inputs: what a capture records (run eagerly by the tests)."""
        ids, positions, slots, lens, table = g.views()
        visible = decode_mask(lens, g.width * self.spec.block_size, self.sliding_window,
                              self.device)
        mask = additive_mask(visible, self.dtype)
        group = DecodeGroup(0, g.rows, self.spec.gather_rows(table), mask)
        meta = AttentionMetadata(slot_mapping=slots, num_decode_tokens=g.rows,
                                 decode_groups=[group], sliding_window=self.sliding_window)
        return self.model(ids, positions, self.kv_caches, meta)

    def _capture(self, rows: int, width: int) -> _Graph | None:
        g = _Graph(rows, width, self.device)
        ids, positions, slots, lens, table = g.views()
        slots.fill_(self.scratch * self.spec.block_size)   # warm-up writes go to scratch
        lens.fill_(1)
        table.fill_(self.scratch)
        stream = torch.cuda.current_stream(self.device)
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            g.graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):   # a first run outside the graph (lazy inits)
                self.forward(g)
            stream.wait_stream(side)
            with torch.cuda.graph(g.graph, pool=self.pool):
                g.output = self.forward(g)
        except Exception as e:  # noqa: BLE001 - any failed capture: fall back, keep serving
            # NOTE: a capture that fails inside torch.cuda.graph leaves its stream current.
            torch.cuda.set_stream(stream)
            if isinstance(e, torch.OutOfMemoryError):
                self.max_cells = min(self.max_cells or rows * width, rows * width)
                logger.warning("CUDA graph (B=%d, W=%d) ran out of memory: steps this large "
                               "decode eagerly", rows, width)
            else:
                self.failed = True
                logger.warning("CUDA graph capture failed (B=%d, W=%d); decoding eagerly",
                               rows, width, exc_info=True)
            return None
        self.graphs[(rows, width)] = g
        return g
