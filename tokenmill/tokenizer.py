"""Tokenizer, chat template and generation defaults of a local model folder (front process)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.sampling_params import SamplingParams

# generation_config.json keys that become default sampling parameters (as vLLM does).
_GEN_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class GenerationDefaults:
    eos_token_ids: list[int] = field(default_factory=list)
    sampling: dict = field(default_factory=dict)


def load_tokenizer(path: str, chat_template: str | None = None):
    """transformers' AutoTokenizer from a local folder (users compare against it)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"tokenizer folder not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds here; say what and where
        raise ValueError(f"could not load the tokenizer from {path}: {e}") from e
    if chat_template is not None:
        tok.chat_template = _read_template(chat_template)
    return tok


def _read_template(value: str) -> str:
    p = Path(value)
    if len(value) < 4096 and p.is_file():
        return p.read_text()
    return value


def load_generation_defaults(path: str, tokenizer) -> GenerationDefaults:
    """EOS ids (generation_config.json, else the tokenizer's) and default sampling values."""
    gen = {}
    gfile = Path(path) / "generation_config.json"
    if gfile.is_file():
        gen = json.loads(gfile.read_text())
    eos = gen.get("eos_token_id")
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    sampling = {k: gen[k] for k in _GEN_DEFAULT_KEYS if gen.get(k) is not None}
    # HF's generation_config often carries temperature/top_p without do_sample; they only
    # apply when sampling is on.
    if not gen.get("do_sample", False):
        sampling = {k: v for k, v in sampling.items() if k == "repetition_penalty"}
    return GenerationDefaults(eos_token_ids=eos_ids, sampling=sampling)


def default_sampling_params(defaults: GenerationDefaults, **overrides) -> SamplingParams:
    return SamplingParams(**{**defaults.sampling, **overrides})


def apply_chat_template(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True,
                        continue_final_message: bool = False, tools: list | None = None,
                        chat_template: str | None = None, **template_kwargs) -> str:
    """Render messages with the model's chat template; a clear error when it has none."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; pass one with --chat-template "
                         "(or chat_template=...), or use the completions API")
    if continue_final_message and add_generation_prompt:
        add_generation_prompt = False
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=chat_template, tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, **template_kwargs)
