"""Model parity with Hugging Face transformers (float32, eager attention) for every family,
through the paged KV cache: one-shot prefill, chunked prefill + decode on a scattered block
table, a mixed decode/prefill batch, sliding windows; plus loader errors and the registry."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from tokenmill.models.loader import load_hf_config, load_model, resolve_dtype
from tokenmill.models.qwen2 import uniform_sliding_window
from tokenmill.models.registry import get_model_class, supported_architectures
from tokenmill.testing import TEST_ARCHS
from tokenmill.testing.checkpoints import make_checkpoint
from tokenmill.worker.attention import AttentionMetadata, PrefillChunk, causal_mask, decode_mask

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


def new_caches(model, num_blocks: int = 16):
    shape = (num_blocks, BLOCK, model.num_kv_heads, model.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.num_layers)]


def slots(blocks: list[int], start: int, end: int) -> list[int]:
    return [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, end)]


def nblocks(ctx: int) -> int:
    return -(-ctx // BLOCK)


@torch.no_grad()
def run(model, caches, ids: list[int], positions: list[int], meta) -> torch.Tensor:
    hidden = model(torch.tensor(ids), torch.tensor(positions), caches, meta)
    assert hidden.shape == (len(ids), model.hidden_size)
    return model.compute_logits(hidden)


def prefill_meta(blocks, start, num, window=None, force_mask=False, row0=0) -> PrefillChunk:
    ctx = start + num
    mask = None
    if start > 0 or force_mask:
        mask = causal_mask(num, start, ctx, window, "cpu")
    return PrefillChunk(row0, num, start, torch.tensor(blocks[:nblocks(ctx)]), mask)


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
    meta = AttentionMetadata(slot_mapping=torch.arange(20),
                             prefills=[PrefillChunk(0, 20, 0, torch.arange(nblocks(20)), None)])
    assert_close(run(model, new_caches(model), ids, list(range(20)), meta),
                 hf_logits(path, tuple(ids)))


@pytest.mark.parametrize("arch", TEST_ARCHS)
def test_chunked_prefill_then_decode_matches_hf(ckpt, arch):
    path = ckpt(arch)
    model, ids = load(path), prompt(20, seed=1)
    ref = hf_logits(path, tuple(ids))
    caches, blocks = new_caches(model), [7, 3, 11, 0, 5, 9]   # scattered on purpose

    meta = AttentionMetadata(slot_mapping=torch.tensor(slots(blocks, 0, 12)),
                             prefills=[prefill_meta(blocks, 0, 12)])
    assert_close(run(model, caches, ids[:12], list(range(12)), meta), ref[:12])

    meta = AttentionMetadata(slot_mapping=torch.tensor(slots(blocks, 12, 19)),
                             prefills=[prefill_meta(blocks, 12, 7)])
    assert_close(run(model, caches, ids[12:19], list(range(12, 19)), meta), ref[12:19])

    meta = AttentionMetadata(slot_mapping=torch.tensor(slots(blocks, 19, 20)), num_decode_tokens=1,
                             decode_block_table=torch.tensor([blocks[:nblocks(20)]]),
                             decode_mask=decode_mask([20], nblocks(20) * BLOCK, None, "cpu"))
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

    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots(blocks_a, 0, 20) + slots(blocks_b, 0, 12)),
        prefills=[prefill_meta(blocks_a, 0, 20), prefill_meta(blocks_b, 0, 12, row0=20)])
    out = run(model, caches, a[:20] + b[:12], list(range(20)) + list(range(12)), meta)
    assert_close(out[:20], ref_a[:20])
    assert_close(out[20:], ref_b[:12])

    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots(blocks_a, 20, 21) + slots(blocks_b, 12, 16)),
        num_decode_tokens=1, decode_block_table=torch.tensor([blocks_a[:nblocks(21)]]),
        decode_mask=decode_mask([21], nblocks(21) * BLOCK, None, "cpu"),
        prefills=[prefill_meta(blocks_b, 12, 4, row0=1)])
    out = run(model, caches, a[20:21] + b[12:16], [20, 12, 13, 14, 15], meta)
    assert_close(out[:1], ref_a[20:21])
    assert_close(out[1:], ref_b[12:16])

    width = nblocks(22)
    table = [blocks_a[:width], blocks_b[:nblocks(17)] + [0] * (width - nblocks(17))]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots(blocks_a, 21, 22) + slots(blocks_b, 16, 17)),
        num_decode_tokens=2, decode_block_table=torch.tensor(table),
        decode_mask=decode_mask([22, 17], width * BLOCK, None, "cpu"))
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
    blocks = list(range(nblocks(20)))
    meta = AttentionMetadata(slot_mapping=torch.arange(20),
                             prefills=[prefill_meta(blocks, 0, 20, window=8, force_mask=True)])
    assert_close(run(model, new_caches(model), ids, list(range(20)), meta), ref)

    # Chunked prefill then decode, windowed.
    caches, blocks = new_caches(model), [7, 3, 11, 0, 5, 9]
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots(blocks, 0, 6)),
                             prefills=[prefill_meta(blocks, 0, 6)])
    assert_close(run(model, caches, ids[:6], list(range(6)), meta), ref[:6])
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots(blocks, 6, 19)),
                             prefills=[prefill_meta(blocks, 6, 13, window=8)])
    assert_close(run(model, caches, ids[6:19], list(range(6, 19)), meta), ref[6:19])
    meta = AttentionMetadata(slot_mapping=torch.tensor(slots(blocks, 19, 20)), num_decode_tokens=1,
                             decode_block_table=torch.tensor([blocks[:nblocks(20)]]),
                             decode_mask=decode_mask([20], nblocks(20) * BLOCK, 8, "cpu"))
    assert_close(run(model, caches, ids[19:], [19], meta), ref[19:])


def test_sharded_checkpoint_loads_and_matches(ckpt):
    path = ckpt("qwen2", max_shard_size="40KB")
    shards = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(path)
    model, ids = load(path), prompt(20, seed=5)
    meta = AttentionMetadata(slot_mapping=torch.arange(20),
                             prefills=[PrefillChunk(0, 20, 0, torch.arange(nblocks(20)), None)])
    assert_close(run(model, new_caches(model), ids, list(range(20)), meta),
                 hf_logits(path, tuple(ids)))


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
