"""The CUDA-graph decode step, checked on the CPU without the capture: padded to its (B, W)
bucket, with its mask and gather built inside the step from the packed inputs, it gives the
eager step's hidden states, and its padding writes only the scratch block. (The capture
itself runs in the GPU tests: every greedy-parity decode on cuda goes through it.)"""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM
from tokenmill.worker.attention import KVCacheSpec, SeqSpan, build_metadata
from tokenmill.worker.cuda_graphs import MAX_GATHER_BYTES, DecodeGraphs, _Graph, bucket

BS, NUM_BLOCKS = 4, 32


def test_buckets_are_powers_of_two_and_large_steps_stay_eager(tiny_llama):
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 200)] == [1, 2, 4, 8, 8, 16, 256]
    spec = KVCacheSpec(NUM_BLOCKS + 1, BS, 2, 16)
    caches = spec.allocate(1, torch.float32, "cpu")
    graphs = DecodeGraphs(None, caches, spec, NUM_BLOCKS, torch.float32, None, max_rows=100,
                          max_blocks=30)
    assert graphs.shape_for(3, 5) == (4, 8)
    assert graphs.shape_for(100, 30) == (128, 32)
    assert graphs.shape_for(129, 1) is None and graphs.shape_for(1, 33) is None
    graphs.max_rows = graphs.max_blocks = 1 << 20
    cells = MAX_GATHER_BYTES // graphs.bytes_per_cell      # rows * width at the byte cap
    assert graphs.shape_for(64, cells // 64) == (64, cells // 64)
    assert graphs.shape_for(64, cells // 64 + 1) is None
    graphs.max_cells = 64     # a capture of 8 x 8 ran out of memory: that size and up stay eager
    assert graphs.shape_for(8, 4) == (8, 4) and graphs.shape_for(8, 8) is None


@pytest.mark.parametrize("window", [None, 5])
def test_padded_graph_step_equals_the_eager_step(tiny_llama, window):
    llm = LLM(model=tiny_llama, dtype="float32", device="cpu", num_kv_blocks=NUM_BLOCKS,
              block_size=BS, max_model_len=NUM_BLOCKS * BS, show_progress=False)
    model = llm.engine.core.runner.model
    hf = llm.engine.core.runner.hf_config
    spec = KVCacheSpec(NUM_BLOCKS + 1, BS, model.num_kv_heads, model.head_dim)
    gen = torch.Generator().manual_seed(0)
    histories = {3: [5, 9], 9: [0, 7, 2], 6: [11, 4]}   # context length -> its blocks

    def fresh_caches():
        caches = spec.allocate(hf.num_hidden_layers, torch.float32, "cpu")
        spans = [SeqSpan(0, n, b) for n, b in histories.items()]
        ids = torch.randint(3, 200, (sum(histories),), generator=torch.Generator().manual_seed(1))
        pos = torch.cat([torch.arange(n) for n in histories])
        model(ids, pos, caches, build_metadata(spans, spec, window, "cpu"))
        return caches

    # One decode token per sequence, at position n (its blocks cover it).
    ids = torch.randint(3, 200, (len(histories),), generator=gen).tolist()
    positions = list(histories)
    tables = list(histories.values())
    with torch.inference_mode():
        caches = fresh_caches()
        spans = [SeqSpan(p, 1, t) for p, t in zip(positions, tables)]
        want = model(torch.tensor(ids), torch.tensor(positions), caches,
                     build_metadata(spans, spec, window, "cpu"))
        caches = fresh_caches()
        before = [c.clone() for c in caches]
        graphs = DecodeGraphs(model, caches, spec, NUM_BLOCKS, torch.float32, window,
                              max_rows=8, max_blocks=8)
        rows, width = graphs.shape_for(len(ids), 3)
        assert (rows, width) == (4, 4)
        g = _Graph(rows, width, "cpu")
        graphs.fill(g, ids, positions, tables)
        got = graphs.forward(g)[:len(ids)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Only the step's own slots and the scratch block changed.
    slots = {t[p // BS] * BS + p % BS for t, p in zip(tables, positions)}
    for c, b in zip(caches, before):
        changed = (c != b).flatten(2).any(-1).any(0).nonzero().flatten().tolist()  # blocks
        assert set(changed) <= {s // BS for s in slots} | {NUM_BLOCKS}
        assert (c[:, NUM_BLOCKS] != 0).any()   # the padded row wrote its K/V to scratch
