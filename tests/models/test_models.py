"""Model parity with Hugging Face transformers (float32, eager attention) for every family,
through the paged KV cache: one-shot prefill, chunked prefill + decode on a scattered block
table, a mixed decode/prefill batch, sliding windows; bfloat16 with and without the fp32-GEMM
path; plus loader errors and the registry."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F

from tokenmill.models.layers import Linear
from tokenmill.models.loader import load_hf_config, load_model, resolve_dtype
from tokenmill.models.qwen2 import uniform_sliding_window
from tokenmill.models.registry import get_model_class, supported_architectures
from tokenmill.testing import TEST_ARCHS
from tokenmill.testing.checkpoints import make_checkpoint
from tokenmill.worker import cpu_gemm, cpu_kernels
from tokenmill.worker.cpu_gemm import CpuGemmPlan
from tokenmill.worker.attention import KVCacheSpec, SeqSpan, build_metadata

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ATOL = 1e-4
BLOCK = 4  # small blocks so that a 20-token prompt spans several, out of order


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """ckpt(arch, **overrides) -> checkpoint folder, made once per module and arguments."""
    cache: dict = {}

    def make(arch: str, **kw) -> str:
        key = (arch, json.dumps(kw, sort_keys=True))
        if key not in cache:
            cache[key] = str(make_checkpoint(tmp_path_factory.mktemp(arch), arch, **kw))
        return cache[key]

    return make


@functools.lru_cache(maxsize=None)
def hf_logits(path: str, ids: tuple[int, ...]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="eager", local_files_only=True)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()   # [T, V]


def load(path: str):
    return load_model(path, load_hf_config(path), "float32", "cpu", progress=False)


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 700, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


NUM_BLOCKS = 16


def kv_spec(model) -> KVCacheSpec:
    return KVCacheSpec(NUM_BLOCKS, BLOCK, model.num_kv_heads, model.head_dim)


def new_caches(model):
    return kv_spec(model).allocate(model.num_layers, torch.float32, "cpu")


def step_meta(model, *spans: tuple[int, int, list[int]]):
    """Metadata of one step whose rows are these (start_pos, num_tokens, block_ids) spans."""
    return build_metadata([SeqSpan(*s) for s in spans], kv_spec(model), model.sliding_window,
                          "cpu")


def nblocks(ctx: int) -> int:
    return -(-ctx // BLOCK)


@torch.no_grad()
def run(model, caches, ids: list[int], positions: list[int], meta) -> torch.Tensor:
    hidden = model(torch.tensor(ids), torch.tensor(positions), caches, meta)
    assert hidden.shape == (len(ids), model.hidden_size)
    logits = model.compute_logits(hidden)
    assert logits.dtype == next(model.parameters()).dtype   # the sampler widens where needed
    return logits.float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Parity

VARIANTS = [(arch, {}) for arch in TEST_ARCHS] + [
    ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=32)),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("qwen3", dict(attention_bias=True, tie_word_embeddings=True)),
]


@pytest.mark.parametrize("arch,overrides", VARIANTS,
                         ids=[f"{a}-{'-'.join(o) or 'default'}" for a, o in VARIANTS])
def test_prefill_matches_hf(ckpt, arch, overrides):
    path = ckpt(arch, **overrides)
    model = load(path)
    ids = prompt(20)
    meta = step_meta(model, (0, 20, list(range(nblocks(20)))))
    assert_close(run(model, new_caches(model), ids, list(range(20)), meta),
                 hf_logits(path, tuple(ids)))


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_chunked_prefill_then_decode_matches_hf(ckpt, arch):
    path = ckpt(arch)
    model, ids = load(path), prompt(20, seed=1)
    ref = hf_logits(path, tuple(ids))
    caches, blocks = new_caches(model), [7, 3, 11, 0, 5, 9]   # scattered on purpose

    meta = step_meta(model, (0, 12, blocks))
    assert_close(run(model, caches, ids[:12], list(range(12)), meta), ref[:12])

    meta = step_meta(model, (12, 7, blocks))
    assert_close(run(model, caches, ids[12:19], list(range(12, 19)), meta), ref[12:19])

    meta = step_meta(model, (19, 1, blocks))
    assert_close(run(model, caches, ids[19:], [19], meta), ref[19:])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_batch_matches_hf(ckpt, arch):
    """Two sequences share steps: both prefill; A decodes while B prefills a chunk; both decode
    with padded block tables of different lengths."""
    path = ckpt(arch)
    model, a, b = load(path), prompt(22, seed=2), prompt(17, seed=3)
    ref_a, ref_b = hf_logits(path, tuple(a)), hf_logits(path, tuple(b))
    caches = new_caches(model)
    blocks_a, blocks_b = [7, 3, 11, 0, 5, 9], [2, 8, 1, 10, 4]

    meta = step_meta(model, (0, 20, blocks_a), (0, 12, blocks_b))
    out = run(model, caches, a[:20] + b[:12], list(range(20)) + list(range(12)), meta)
    assert_close(out[:20], ref_a[:20])
    assert_close(out[20:], ref_b[:12])

    meta = step_meta(model, (20, 1, blocks_a), (12, 4, blocks_b))
    out = run(model, caches, a[20:21] + b[12:16], [20, 12, 13, 14, 15], meta)
    assert_close(out[:1], ref_a[20:21])
    assert_close(out[1:], ref_b[12:16])

    meta = step_meta(model, (21, 1, blocks_a), (16, 1, blocks_b))
    assert [g.num_seqs for g in meta.decode_groups] == [2]   # one padded group of two
    out = run(model, caches, [a[21], b[16]], [21, 16], meta)
    assert_close(out[:1], ref_a[21:])
    assert_close(out[1:], ref_b[16:])


def test_mistral_sliding_window_matches_hf(ckpt):
    path = ckpt("mistral", sliding_window=8)
    model, ids = load(path), prompt(20, seed=4)
    assert model.sliding_window == 8
    ref = hf_logits(path, tuple(ids))
    # HF 5.23 honours the window in eager attention (create_sliding_window_causal_mask); check
    # that it matters here, so this test would notice an implementation that ignored it.
    full = hf_logits(ckpt("mistral", sliding_window=None), tuple(ids))
    assert (ref[8:] - full[8:]).abs().max() > 1e-2
    assert_close(ref[:8], full[:8])

    # One-shot prefill: the window needs an explicit mask (mask=None is plain causal).
    meta = step_meta(model, (0, 20, list(range(nblocks(20)))))
    assert meta.prefills[0].mask is not None
    assert_close(run(model, new_caches(model), ids, list(range(20)), meta), ref)

    # Chunked prefill then decode, windowed.
    caches, blocks = new_caches(model), [7, 3, 11, 0, 5, 9]
    meta = step_meta(model, (0, 6, blocks))
    assert_close(run(model, caches, ids[:6], list(range(6)), meta), ref[:6])
    meta = step_meta(model, (6, 13, blocks))
    assert_close(run(model, caches, ids[6:19], list(range(6, 19)), meta), ref[6:19])
    meta = step_meta(model, (19, 1, blocks))
    assert_close(run(model, caches, ids[19:], [19], meta), ref[19:])


def test_sharded_checkpoint_loads_and_matches(ckpt):
    path = ckpt("qwen2", max_shard_size="40KB")
    shards = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(path)
    model, ids = load(path), prompt(20, seed=5)
    meta = step_meta(model, (0, 20, list(range(nblocks(20)))))
    assert_close(run(model, new_caches(model), ids, list(range(20)), meta),
                 hf_logits(path, tuple(ids)))


AMX = cpu_kernels.amx_supported(torch.zeros(32, 32, dtype=torch.bfloat16))


@pytest.mark.parametrize("gemm", [
    "plain", "fp32-gemm", "onednn-gemm", "packed-bf16",
    pytest.param("amx", marks=pytest.mark.skipif(not AMX, reason="no usable AMX here"))])
def test_bf16_matches_hf_bf16(ckpt, gemm, monkeypatch):
    """bfloat16 rounds where HF's bfloat16 model rounds, also on the CPU fast paths (fp32 GEMMs
    on weight copies, oneDNN on packed weights, packed bf16 weights, AMX tiles): chunked
    prefill then decode through the cache."""
    from transformers import AutoModelForCausalLM

    if gemm != "amx":
        monkeypatch.setenv("TOKENMILL_AMX", "0")

    path = ckpt("qwen3", dtype="bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                              attn_implementation="sdpa", local_files_only=True)
    ids = prompt(20, seed=6)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    model = load_model(path, load_hf_config(path), "bfloat16", "cpu", progress=False)
    if gemm != "plain":
        # rows per step below: 12, 7, 1
        # the large path from 1 row on, or (packed-bf16) only from 32: never in these steps
        large, min_rows = {"fp32-gemm": ("fp32", 1), "onednn-gemm": ("onednn", 1),
                           "packed-bf16": ("fp32", 32), "amx": ("amx", 1)}[gemm]
        model.use_cpu_gemm(CpuGemmPlan(large, min_rows))
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        assert {m.large for m in linears} == {large}
    caches = kv_spec(model).allocate(model.num_layers, torch.bfloat16, "cpu")
    blocks = [7, 3, 11, 0, 5, 9]
    out = torch.cat([
        run(model, caches, ids[:12], list(range(12)), step_meta(model, (0, 12, blocks))),
        run(model, caches, ids[12:19], list(range(12, 19)), step_meta(model, (12, 7, blocks))),
        run(model, caches, ids[19:], [19], step_meta(model, (19, 1, blocks)))])
    # Logits near 8: one bf16 step is 1/16; summation order may move a rounding by a step.
    torch.testing.assert_close(out, ref, atol=1 / 8, rtol=0)


@pytest.mark.parametrize("large", ["fp32", "onednn", "amx"])
@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "no-native"])
def test_cpu_gemm_linear(native, large, monkeypatch):
    """Each path of ``Linear`` keeps only the copies it uses and gives F.linear's result: few
    rows on the native kernel (else oneDNN's packed weight, bit-identical), many on the plan's
    large path."""
    if large == "amx" and (not AMX or native == "0"):
        pytest.skip("no usable AMX here" if native == "1" else "AMX needs the native kernels")
    monkeypatch.setenv("TOKENMILL_NATIVE_KERNELS", native)
    lin = Linear(64, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(40, 64).to(torch.bfloat16)
    with torch.no_grad():
        before = lin.weight.numel()
        lin.use_cpu_gemm(CpuGemmPlan(large, 32))
        assert lin.large == large
        assert (lin.weight_t_fp32 is not None) == (large == "fp32")
        assert (lin.weight_native is not None) == (native == "1")
        assert (lin.weight_packed is not None) == (large == "onednn" or native == "0")
        kept = sum(t.numel() * t.element_size() for t in (
            lin.weight_t_fp32, lin.weight_native, lin.weight_packed) if t is not None)
        # the native copy pads 48 outputs to 64; oneDNN's blocked layout may pad as well
        assert kept >= Linear.cpu_gemm_bytes(lin.weight, large) >= 2 * before
        small, big = lin(x[:8]), lin(x)
        if lin.weight_native is None:
            assert torch.equal(small, F.linear(x[:8], lin.weight, lin.bias))
        else:   # the native kernel: fp32 sums in another order, one rounding to bf16
            torch.testing.assert_close(small, F.linear(x[:8], lin.weight, lin.bias))
        assert big.dtype == small.dtype == torch.bfloat16
        if large == "onednn":
            assert torch.equal(big, F.linear(x, lin.weight, lin.bias))
        torch.testing.assert_close(big, F.linear(x, lin.weight, lin.bias))


def test_cpu_gemm_plan_is_measured_or_forced(monkeypatch):
    """Without AMX the large path is whichever of fp32 and oneDNN ran the probe matmul faster;
    TOKENMILL_CPU_GEMM forces one, and a wrong value is a clear error."""
    monkeypatch.setenv("TOKENMILL_AMX", "0")
    monkeypatch.delenv("TOKENMILL_CPU_GEMM", raising=False)
    plan = cpu_gemm.choose()
    assert set(plan.gflops) == {"fp32", "onednn"} and min(plan.gflops.values()) > 0
    assert plan.large == max(plan.gflops, key=plan.gflops.get)
    assert plan.min_rows == cpu_gemm.MIN_ROWS[plan.large]
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "fp32")
    assert cpu_gemm.choose() == CpuGemmPlan("fp32", cpu_gemm.MIN_ROWS["fp32"])
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="TOKENMILL_CPU_GEMM"):
        cpu_gemm.choose()


# ---------------------------------------------------------------------------------------------
# Loading


def test_loaded_model_shape_and_ties(ckpt):
    model = load(ckpt("llama3"))  # tie_word_embeddings=True
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.sliding_window) == \
        (2, 2, 16, None)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "cpu" and not t.requires_grad for t in model.parameters())
    assert all(not t.is_meta for t in tensors)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    qwen3 = load(ckpt("qwen3"))
    assert qwen3.head_dim == 32 and qwen3.hidden_size == 64  # explicit head_dim wins


def test_resolve_dtype_and_bf16_load(ckpt):
    path = ckpt("qwen3", dtype="bfloat16")
    config = load_hf_config(path)
    assert resolve_dtype("auto", config) == torch.bfloat16
    assert resolve_dtype("float32", config) == torch.float32
    assert resolve_dtype("auto", load_hf_config(ckpt("llama"))) == torch.float32
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype("int8", config)
    model = load_model(path, config, "auto", "cpu", progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _copy(src: str, dst) -> str:
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_loader_errors(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found: .*nope"):
        load_hf_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_config(tmp_path / "empty")

    no_weights = _copy(ckpt("llama"), tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_hf_config(no_weights)
    open(os.path.join(no_weights, "pytorch_model.bin"), "wb").close()
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*not supported"):
        load_hf_config(no_weights)

    alien = _copy(ckpt("llama"), tmp_path / "alien")
    cfg_file = os.path.join(alien, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["architectures"] = ["FancyForCausalLM"]
    json.dump(cfg, open(cfg_file, "w"))
    with pytest.raises(ValueError, match="unsupported architecture: FancyForCausalLM; "
                                         "supported: .*LlamaForCausalLM"):
        load_hf_config(alien)

    sharded = _copy(ckpt("qwen2", max_shard_size="40KB"), tmp_path / "sharded")
    victim = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))[-1]
    os.remove(os.path.join(sharded, victim))
    with pytest.raises(FileNotFoundError, match=f"shard {victim} .* is missing"):
        load_hf_config(sharded)


def test_load_weights_errors(ckpt):
    path = ckpt("llama")
    config = load_hf_config(path)
    model = get_model_class("LlamaForCausalLM")(config)
    from safetensors.torch import load_file
    weights = load_file(os.path.join(path, "model.safetensors"))

    model.load_weights(list(weights.items()) + [("model.rotary_emb.inv_freq", torch.ones(8))])
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.9.mlp.up_proj.weight'"):
        model.load_weights(list(weights.items()) + [("model.layers.9.mlp.up_proj.weight",
                                                     torch.ones(1))])
    partial = {k: v for k, v in weights.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ValueError, match="missing 1 tensor.*layers.1.self_attn.k_proj.weight"):
        model.load_weights(partial.items())
    bad = dict(weights, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\), expected \(64,\)"):
        model.load_weights(bad.items())


def test_registry():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
            "Qwen3ForCausalLM"} <= set(supported_architectures())
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'; "
                                         "supported: .*Qwen3ForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def test_qwen_sliding_window_config():
    from transformers import Qwen2Config

    base = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, sliding_window=8)
    assert uniform_sliding_window(Qwen2Config(**base)) is None  # use_sliding_window=False
    assert uniform_sliding_window(
        Qwen2Config(**base, use_sliding_window=True, max_window_layers=0)) == 8
    with pytest.raises(NotImplementedError, match="mix of full and sliding"):
        uniform_sliding_window(Qwen2Config(**base, use_sliding_window=True, max_window_layers=1))
