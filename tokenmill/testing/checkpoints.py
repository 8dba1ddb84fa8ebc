"""Tiny random-weight Hugging Face checkpoints for tests and benchmarks, built offline.

``make_checkpoint(out_dir, "qwen3")`` writes a folder that both tokenmill's loader and
``transformers`` load with no network: ``config.json``, ``*.safetensors`` (sharded with an
``index.json`` when ``max_shard_size`` is small), ``generation_config.json`` and a byte-level BPE
tokenizer trained on a small built-in multilingual corpus, with a ChatML chat template.

CLI::

    python -m tokenmill.testing.checkpoints --arch llama --out DIR [--shards N]
        [--dtype float32] [--size tiny|mid]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Model sizes. "mid" is big enough for throughput benchmarks to be dominated by matmuls. A
# size without a vocab_size gets the trained tokenizer's DEFAULT_VOCAB.
DEFAULT_VOCAB = 800
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512),
    "mid": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, intermediate_size=1536, max_position_embeddings=2048),
    # Qwen2.5-0.5B's shape, vocabulary included, for benchmarks (`bench compare`).
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864,
                         max_position_embeddings=32768, vocab_size=151936),
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "I am fine, thank you. And you?",
    "The weather is nice and the sun is shining.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Tokyo is a large city in Japan.",
    "Once upon a time, there was a little model that wanted to generate text.",
    "Large language models predict the next token given the previous tokens.",
    "The cache stores keys and values for every layer of the transformer.",
    "Please write a short poem about the sea.",
    "What is the answer to life, the universe and everything? It is 42.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2025-01-01",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "<tool_call> </tool_call> <think> </think>",
    "You are a helpful assistant. Answer the user's question.",
    "Un café au lait, s'il vous plaît. Où est la gare?",
    "Ça va très bien, merci beaucoup. À bientôt!",
    "¿Dónde está la biblioteca? Mañana es sábado.",
    "Grüße aus München! Die Straße ist schön.",
    "日本語のテキストも少し含めます。東京は大きい都市です。",
    "中文：你好，世界！今天天气很好。",
    "한국어 문장도 조금 있습니다.",
    "Русский текст: привет, как дела?",
    "Emoji time: 😀 🚀 🎉 👍 ❤️ 🌍",
    "Math symbols: α β γ δ π ∑ ∫ √ ≤ ≥ ≠ ∞",
]

_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + message['content'] + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}"
    "{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=4)
def _train_tokenizer_json(vocab_size: int) -> str:
    """Train a byte-level BPE on the built-in corpus (cached: training is deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # NOTE: the pipeline is exactly Qwen2's (NFC, its split regex, byte level): transformers
    # rebuilds a qwen2 model's tokenizer that way whatever tokenizer.json says, and every arch
    # should tokenize the same text to the same ids.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=2)
def _widen_tokenizer_json(vocab_size: int) -> str:
    """The trained tokenizer, grown to ``vocab_size`` with synthetic merges (seeded), so that a
    model with a real model's vocabulary (e.g. Qwen2.5's 151,936) decodes every id it samples
    to some text, in tokenmill and in llama.cpp alike. Real text still tokenizes as before:
    the new merges come after the trained ones."""
    import json
    import random

    tok = json.loads(_train_tokenizer_json(DEFAULT_VOCAB))
    vocab, merges = tok["model"]["vocab"], tok["model"]["merges"]
    as_pairs = bool(merges) and isinstance(merges[0], list)
    specials = {t["content"] for t in tok["added_tokens"]}
    pieces = sorted(t for t in vocab if t not in specials)
    alphabet = [t for t in pieces if len(t) == 1]
    rng = random.Random(0)
    next_id = max(vocab.values()) + 1
    while next_id < vocab_size:
        a, b = rng.choice(pieces), rng.choice(alphabet)
        if a + b in vocab or len(a) >= 12:
            continue
        vocab[a + b] = next_id
        merges.append([a, b] if as_pairs else f"{a} {b}")
        pieces.append(a + b)
        next_id += 1
    return json.dumps(tok, ensure_ascii=False)


def make_tokenizer(vocab_size: int = DEFAULT_VOCAB):
    """A ``PreTrainedTokenizerFast`` with ChatML specials and chat template (trained on the
    built-in corpus; beyond 800 tokens, grown with synthetic merges)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text = _train_tokenizer_json(vocab_size) if vocab_size <= DEFAULT_VOCAB else \
        _widen_tokenizer_json(vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(text),
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"])
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def _hf_config(arch: str, size: str, vocab_size: int, ids: dict[str, int], overrides: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kw = dict(SIZES[size], vocab_size=vocab_size, rms_norm_eps=1e-6, rope_theta=10000.0,
              bos_token_id=None, eos_token_id=ids["<|im_end|>"],
              pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    if arch == "llama":
        cls = LlamaConfig
    elif arch == "llama3":
        cls = LlamaConfig
        orig = kw["max_position_embeddings"] // 4
        kw.update(rope_theta=500000.0, tie_word_embeddings=True,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=orig))
    elif arch == "mistral":
        cls = MistralConfig
        kw.update(sliding_window=4096)
    elif arch == "qwen2":
        cls = Qwen2Config
        kw.update(use_sliding_window=False, tie_word_embeddings=True)
    elif arch == "qwen3":
        cls = Qwen3Config
        kw.update(head_dim=32, use_sliding_window=False)  # head_dim != hidden/heads on purpose
    else:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    kw.update(overrides)
    if "rope_scaling" in kw:
        kw["rope_parameters"] = {**kw.pop("rope_scaling"), "rope_theta": kw.pop("rope_theta")}
    return cls(**kw)


@torch.no_grad()
def _randomize(model, std: float) -> None:
    """Random weights everywhere, norms and biases included, so that a loader which drops or
    misplaces any tensor shows up in a parity test (HF's init leaves norms at 1, biases at 0)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.1)
        else:
            # Scaled by fan-in (for embeddings: by hidden size, so that tied logits are as
            # spread as untied ones): wide enough that greedy decoding does not collapse to one
            # repeated token, small enough that float32 logits stay within ~10 of zero.
            p.normal_(0.0, std / math.sqrt(p.shape[-1]))


def _size_vocab(size: str) -> int:
    return SIZES[size].get("vocab_size", DEFAULT_VOCAB)


def make_checkpoint(out_dir, arch: str = "llama", *, size: str = "tiny", seed: int = 0,
                    dtype: str = "float32", max_shard_size=None, **config_overrides) -> Path:
    """Write a random-weight checkpoint of ``arch`` (one of ``ARCHS``) to ``out_dir``.

    ``config_overrides`` go to the transformers config (e.g. ``sliding_window=8``,
    ``num_hidden_layers=3``). ``max_shard_size`` (e.g. ``"20KB"`` or an int of bytes) makes
    ``save_pretrained`` shard the weights and write ``model.safetensors.index.json``.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = make_tokenizer(config_overrides.get("vocab_size", _size_vocab(size)))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = _hf_config(arch, size, len(tokenizer), ids, config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, std=2.0)
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out


def make_checkpoint_size_bytes(arch: str, size: str, dtype: str) -> int:
    """Bytes of the weights ``make_checkpoint`` would write (to split them into N shards)."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(_size_vocab(size))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = _hf_config(arch, size, len(tokenizer), ids, {})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    return n * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama", choices=ARCHS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="tiny", choices=list(SIZES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shards", type=int, default=1, help="Split the weights into ~N files.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    max_shard_size = None
    if args.shards > 1:
        # Size the shards from the parameter count of a meta-device model (no memory used).
        probe = make_checkpoint_size_bytes(args.arch, args.size, args.dtype)
        max_shard_size = max(1, math.ceil(probe / args.shards))
    path = make_checkpoint(args.out, args.arch, size=args.size, seed=args.seed, dtype=args.dtype,
                           max_shard_size=max_shard_size)
    files = sorted(p.name for p in path.iterdir())
    print(json.dumps({"path": str(path), "files": files}))


if __name__ == "__main__":
    main()
