"""Mistral: Llama with sliding-window attention (each token sees the last ``sliding_window``
keys). The window is applied by the masks the runner builds from ``sliding_window``."""

from __future__ import annotations

from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.registry import register


@register("MistralForCausalLM")
class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def get_sliding_window(cls, config) -> int | None:
        return getattr(config, "sliding_window", None)
