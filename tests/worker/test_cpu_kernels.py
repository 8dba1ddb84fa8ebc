"""The native CPU kernels.

Decode attention against the PyTorch path (itself checked against dense attention in
test_attention.py): float32 and bfloat16, grouped K/V heads, ragged lengths over shuffled
blocks, sliding windows, strided query rows; prefill chunks as query rows; the model runner
falling back to PyTorch when the kernels are switched off. The few-rows bf16 linear against a float32 reference."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill.worker import cpu_kernels
from tokenmill.worker.attention import KVCacheSpec, SeqSpan, build_metadata, paged_attention

pytestmark = pytest.mark.skipif(
    not cpu_kernels.supports(torch.device("cpu"), torch.float32, 8, 2, 64),
    reason="no C compiler here: the native kernel cannot be built")


def decode_step(dtype, H, HKV, D, lens, bs=16, window=None, seed=0):
    """(native output, PyTorch output) for one decode step of sequences of ``lens`` tokens."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    spec = KVCacheSpec(num_blocks, bs, HKV, D)
    cache = torch.randn(2 * HKV, num_blocks, bs, D, generator=gen).to(dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    spans = [SeqSpan(n - 1, 1, [free.pop() for _ in range(-(-n // bs))]) for n in lens]
    # The step's own K/V rows are already in the cache; the torch path writes them again.
    k_new = torch.stack([cache[:HKV, s.block_ids[s.start_pos // bs], s.start_pos % bs]
                         for s in spans])
    v_new = torch.stack([cache[HKV:, s.block_ids[s.start_pos // bs], s.start_pos % bs]
                         for s in spans])
    # Query rows strided as in the model (q is a view of the q|k tensor after rope).
    qk = torch.randn(len(lens), H + HKV, D, generator=gen).to(dtype)
    q = qk[:, :H]
    scale = D ** -0.5
    native = build_metadata(spans, spec, window, "cpu", native_decode=True)
    assert native.decode_table is not None and not native.decode_groups
    plain = build_metadata(spans, spec, window, "cpu")
    return (paged_attention(q, k_new, v_new, cache, native, scale),
            paged_attention(q, k_new, v_new, cache, plain, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,HKV,D", [(8, 2, 64), (14, 2, 64), (4, 4, 128), (4, 2, 16)])
def test_native_decode_matches_torch_path(dtype, H, HKV, D):
    lens = [1, 2, 15, 16, 17, 100, 333, 64, 5]
    got, want = decode_step(dtype, H, HKV, D, lens)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_sliding_window(dtype):
    got, want = decode_step(dtype, 8, 2, 64, [3, 40, 41, 200, 7], window=24, seed=1)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)


PREFILL = cpu_kernels.prefill_supported(torch.bfloat16, 64)


@pytest.mark.skipif(not PREFILL, reason="no AVX-512 bf16 on this CPU")
@pytest.mark.parametrize("H,HKV,D,window", [(14, 2, 64, None), (8, 8, 128, None),
                                            (8, 2, 64, 24)])
def test_native_prefill_matches_sdpa(H, HKV, D, window):
    """A mixed step (decodes, a prompt from position 0, chunks continuing at 16 and 37, a
    one-token chunk) through the kernel, one query row per token, against SDPA per chunk."""
    bs, gen, rng = 16, torch.Generator().manual_seed(H + D), random.Random(D)
    shape = [(70, 1), (9, 1), (0, 45), (16, 33), (37, 60), (50, 1), (0, 130)]  # (start, tokens)
    spans, free = [], list(range(3, 3 + sum(-(-(a + n) // bs) for a, n in shape) + 2))
    rng.shuffle(free)
    for a, n in shape:
        spans.append(SeqSpan(a, n, [free.pop() for _ in range(-(-(a + n) // bs))]))
    spec = KVCacheSpec(len(free) + 3 + sum(len(s.block_ids) for s in spans), bs, HKV, D)
    cache = torch.randn(2 * HKV, spec.num_blocks, bs, D, generator=gen).to(torch.bfloat16)
    T = sum(n for _, n in shape)
    q = torch.randn(T, H + HKV, D, generator=gen).to(torch.bfloat16)[:, :H]   # strided rows
    k = torch.randn(T, HKV, D, generator=gen).to(torch.bfloat16)
    v = torch.randn(T, HKV, D, generator=gen).to(torch.bfloat16)
    native = build_metadata(spans, spec, window, "cpu", native_decode=True, native_prefill=True)
    assert native.decode_table.shape[0] == T and not native.prefills
    plain = build_metadata(spans, spec, window, "cpu")
    assert len(plain.prefills) == 5
    got = paged_attention(q, k, v, cache.clone(), native, D ** -0.5)
    want = paged_attention(q, k, v, cache.clone(), plain, D ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    # Both round P to bf16 before P.V: most outputs agree to the last bit.
    assert (got == want).float().mean() > 0.8


def test_unsupported_geometry_is_refused():
    assert not cpu_kernels.supports(torch.device("cpu"), torch.float32, 4, 2, 8)   # D % 16
    assert not cpu_kernels.supports(torch.device("cpu"), torch.float16, 4, 2, 64)
    assert not cpu_kernels.supports(torch.device("meta"), torch.float32, 4, 2, 64)


def test_switch_off_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("TOKENMILL_NATIVE_KERNELS", "0")
    assert not cpu_kernels.supports(torch.device("cpu"), torch.float32, 8, 2, 64)


def test_failed_build_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    """A compiler that fails (here `false`) leaves the PyTorch paths, with a warning."""
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    assert not cpu_kernels.supports(torch.device("cpu"), torch.float32, 8, 2, 64)
    assert not cpu_kernels.linear_supported(torch.zeros(16, 32, dtype=torch.bfloat16))
    assert "building the CPU kernels failed" in caplog.text
    assert not list(tmp_path.rglob("*.so"))


def test_engine_greedy_same_with_and_without_kernel(tmp_path, monkeypatch):
    """A whole engine (fp32, batched decodes over many blocks): same tokens both ways."""
    from tokenmill import LLM, SamplingParams
    from tokenmill.testing.checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path / "m", "llama", size="tiny")
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 40, 77, 18)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("TOKENMILL_NATIVE_KERNELS", flag)
        llm = LLM(model=str(path), dtype="float32", show_progress=False, block_size=4,
                  device="cpu")
        assert llm.engine.core.runner.native_decode == (flag == "1")
        outs[flag] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs["1"] == outs["0"]


@pytest.mark.skipif(not cpu_kernels.linear_supported(torch.zeros(16, 32, dtype=torch.bfloat16)),
                    reason="no AVX-512 bf16 on this CPU")
# Row tiles of every shape the kernel has: 1-6 rows x 4 output blocks, 7-8 x 3, 9-12 x 2,
# 13-16 x 1; 17 and 33 rows split into tiles with zero-padded rows.
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 13, 16, 17, 31, 33])
@pytest.mark.parametrize("n,k,bias", [(48, 64, True), (1000, 512, False), (37, 94, True)])
def test_native_linear_matches_float32_reference(m, n, k, bias):
    gen = torch.Generator().manual_seed(m * n)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen) if bias else None
    x = torch.randn(m, 2 * k, generator=gen).to(torch.bfloat16)[:, ::2]   # strided rows
    got = cpu_kernels.linear(x, cpu_kernels.pack_linear(w), b, n)
    want = x.float() @ w.float().t() + (b if bias else 0)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    # Rounded once from fp32 sums: equal to the rounded reference but where summation order
    # moves a value across a rounding boundary (rare, one bf16 step).
    exact = got == want.to(torch.bfloat16)
    assert exact.float().mean() > 0.99
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=1 / 128)


AMX = cpu_kernels.amx_supported(torch.zeros(32, 32, dtype=torch.bfloat16))


@pytest.mark.skipif(not AMX, reason="no usable AMX on this CPU")
@pytest.mark.parametrize("m", [1, 16, 31, 32, 33, 48, 100, 300])
@pytest.mark.parametrize("n,k,bias", [(48, 64, True), (1000, 512, False), (37, 96, True)])
def test_amx_linear_matches_float32_reference(m, n, k, bias):
    """Tiles over ragged rows (a zero-padded last block of one or two A tiles) and columns (a
    padded weight)."""
    gen = torch.Generator().manual_seed(m * n + 1)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen) if bias else None
    x = torch.randn(m, k + 32, generator=gen).to(torch.bfloat16)[:, 32:]   # rows k+32 apart
    got = cpu_kernels.linear(x, cpu_kernels.pack_linear(w), b, n, amx=True)
    want = x.float() @ w.float().t() + (b if bias else 0)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    exact = got == want.to(torch.bfloat16)
    assert exact.float().mean() > 0.99
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=1 / 128)


def test_amx_needs_k_multiple_of_32_and_can_be_switched_off(monkeypatch):
    assert not cpu_kernels.amx_supported(torch.zeros(32, 48, dtype=torch.bfloat16))
    assert not cpu_kernels.amx_supported(torch.zeros(32, 64, dtype=torch.float32))
    monkeypatch.setenv("TOKENMILL_AMX", "0")
    assert not cpu_kernels.amx_supported(torch.zeros(32, 64, dtype=torch.bfloat16))


ELEMENTWISE = cpu_kernels.elementwise_supported(torch.zeros(1, dtype=torch.bfloat16))


@pytest.mark.skipif(not ELEMENTWISE, reason="no AVX-512 bf16 on this CPU")
@pytest.mark.parametrize("t,d", [(1, 64), (7, 100), (300, 512)])
def test_fused_add_rmsnorm_and_silu_mul_round_as_torch(t, d):
    """Same bf16 roundings as the torch ops they replace: equal but where a row's sum order
    or exp's last bit moves a value across a rounding boundary (one bf16 step, rare)."""
    from tokenmill.models.layers import RMSNorm

    gen = torch.Generator().manual_seed(t * d)
    x = (torch.randn(t, d + 8, generator=gen) * 3).to(torch.bfloat16)[:, 8:]   # strided rows
    delta = torch.randn(t, d, generator=gen).to(torch.bfloat16)
    norm = RMSNorm(d, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, generator=gen) + 0.5)
        want_res = x + delta
        want = norm._norm(want_res)
        got, res = cpu_kernels.add_rmsnorm(x, delta, norm.weight, 1e-6)
        assert torch.equal(res, want_res)
        assert (got == want).float().mean() > 0.99
        torch.testing.assert_close(got, want, atol=0, rtol=1 / 64)
        assert torch.equal(norm(x, delta)[1], want_res)   # the module takes the fused path
        alone, same = cpu_kernels.add_rmsnorm(x, None, norm.weight, 1e-6)
        assert same.data_ptr() == x.data_ptr() or torch.equal(same, x)
        torch.testing.assert_close(alone, norm._norm(x), atol=0, rtol=1 / 64)

        gu = (torch.randn(t, 2 * d, generator=gen) * 4).to(torch.bfloat16)
        want = torch.nn.functional.silu(gu[:, :d]) * gu[:, d:]
        got = cpu_kernels.silu_mul(gu)
        assert (got == want).float().mean() > 0.99
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1 / 64)


@pytest.mark.skipif(not ELEMENTWISE, reason="no AVX-512 bf16 on this CPU")
@pytest.mark.parametrize("d", [16, 64, 80])
def test_fused_rope_rounds_as_torch(d):
    from tokenmill.models.layers import RotaryEmbedding, apply_rope

    gen = torch.Generator().manual_seed(d)
    rotary = RotaryEmbedding(d, {"rope_type": "default", "rope_theta": 10000.0}, 4096)
    cos, sin = rotary(torch.tensor([0, 5, 17, 300, 4000]), torch.bfloat16)
    qkv = torch.randn(5, 7, d, generator=gen).to(torch.bfloat16)
    x = qkv[:, :5]                                     # q|k heads of a fused qkv: strided
    half = d // 2
    want = x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin
    got = cpu_kernels.rope(x, cos, sin)
    assert torch.equal(got, want)                      # every rounding where torch's is
    assert torch.equal(apply_rope(x, cos, sin), want)


def test_elementwise_refuses_other_dtypes_and_the_switch(monkeypatch):
    assert not cpu_kernels.elementwise_supported(torch.zeros(4, 8))
    monkeypatch.setenv("TOKENMILL_NATIVE_KERNELS", "0")
    assert not cpu_kernels.elementwise_supported(torch.zeros(4, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("b,v", [(1, 151_936), (5, 1000), (64, 37), (3, 1)])
def test_bf16_argmax_matches_torch(b, v):
    g = torch.Generator().manual_seed(b * v)
    logits = (torch.randn(b, v + 3, generator=g) * 4).bfloat16()[:, :v]   # strided rows
    # Ties (bf16 has few values near the top: torch keeps the first), -inf and NaN rows.
    logits[0, v // 2] = logits[0, v // 3] = 1000.0
    if b > 2:
        logits[1] = float("-inf")
        logits[2, v - 1] = float("nan")
    got = cpu_kernels.argmax(logits)
    assert got.dtype == torch.long
    assert got.tolist() == logits.argmax(dim=-1).tolist() == logits.float().argmax(-1).tolist()
