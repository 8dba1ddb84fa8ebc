"""Qwen2 / Qwen2.5: Llama with a bias on the q, k and v projections (not on o).

Qwen2 configs can ask for sliding-window attention on the layers from ``max_window_layers`` up
(``use_sliding_window``); released checkpoints leave it off. One window for all layers is
supported; a mix of full and windowed layers is refused rather than run wrongly.
"""

from __future__ import annotations

from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.registry import register


def uniform_sliding_window(config) -> int | None:
    """The window shared by all layers (None if none); raise if layers differ."""
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", False) or window is None:
        return None
    layer_types = getattr(config, "layer_types", None) or ["sliding_attention"]
    if all(t == "full_attention" for t in layer_types):
        return None
    if all(t == "sliding_attention" for t in layer_types):
        return window
    raise NotImplementedError(
        f"{type(config).__name__}: a mix of full and sliding-window layers "
        f"(max_window_layers={getattr(config, 'max_window_layers', None)}) is not supported")


@register("Qwen2ForCausalLM")
class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def get_sliding_window(cls, config) -> int | None:
        return uniform_sliding_window(config)

    def attention_options(self, config) -> dict:
        return dict(qkv_bias=True, o_bias=False)
