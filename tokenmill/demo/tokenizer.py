"""The demo model's tokenizer (byte-level BPE trained on generated data) and chat template.

The template is ChatML in Qwen3's shape: tools go into the system prompt inside ``<tools>``,
assistant tool calls are ``<tool_call>`` blocks, ``tool`` messages become ``<tool_response>``
blocks inside a user turn, and ``enable_thinking`` (off unless passed as true) decides whether
the generation prompt pre-fills an empty ``<think>`` block (no thinking) or leaves the model to
open one. Earlier assistant turns are rendered without their ``<think>`` part.

The saved folder declares ``tokenizer_class: TokenizersBackend`` and the model is a ``qwen3``,
for which transformers 5 loads ``tokenizer.json`` as it is (it rebuilds e.g. ``qwen2``-type
tokenizers); ``check_same_ids`` verifies that on sample texts.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Single tokens but not "special": decoding with skip_special_tokens keeps them (as Qwen does).
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                 "</tool_response>"]

# Qwen2's split regex (digits one by one, punctuation runs), except that a word never takes
# the space or quote in front of it: "Oslo" is then the same token in "weather in Oslo" and
# in {"city": "Oslo"}, and a model this small copies it (with " Oslo" vs "Oslo" it did not
# learn to, in a 5M-token run). It costs ~25% more tokens per text. An underscore does join
# the word after it: "get_current_weather" is get/_current/_weather, so copying a listed tool
# name is one token after another; with "_" a token of its own, the model had to look two
# tokens back to know what follows each "_", and it recalled a familiar name instead.
SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|_?\p{L}+|\p{N}|"""
               r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{- raise_exception('only the first message may be a system message') }}{%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}
        {{- '<|im_start|>assistant\n' + content }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if loop.first and content or not loop.first %}{{- '\n' }}{%- endif %}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call %}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- else %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if not (enable_thinking is defined and enable_thinking) %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on ``texts``; deterministic."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, trainers)

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(MARKUP_TOKENS),
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return tok


def to_transformers(tok):
    """The trained tokenizer as a transformers tokenizer with the chat template set."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", bos_token=None,
                                 additional_special_tokens=["<|im_start|>"],
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save(tok, folder) -> None:
    """Write tokenizer.json, tokenizer_config.json (+ chat_template.jinja) into ``folder``."""
    import json
    from pathlib import Path

    hf = to_transformers(tok)
    hf.save_pretrained(folder)
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "TokenizersBackend"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def check_same_ids(tok, folder, texts: Iterable[str]) -> int:
    """Assert that transformers' AutoTokenizer on ``folder`` encodes and decodes ``texts``
    exactly as the trained ``tok`` does; returns the number of texts checked."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    n = 0
    for text in texts:
        want = tok.encode(text, add_special_tokens=False).ids
        got = hf(text, add_special_tokens=False).input_ids
        if got != want:
            raise AssertionError(f"AutoTokenizer differs on {text!r}:\n{got}\n{want}")
        if hf.decode(got) != tok.decode(want, skip_special_tokens=False):
            raise AssertionError(f"decode differs on {text!r}")
        n += 1
    return n
