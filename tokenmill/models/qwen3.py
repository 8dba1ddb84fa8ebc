"""Qwen3 (dense): Llama with an RMSNorm over each head of q and k, applied before rope, an
explicit ``head_dim`` (often not hidden_size / num_heads) and no q/k/v bias by default."""

from __future__ import annotations

from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.qwen2 import uniform_sliding_window
from tokenmill.models.registry import register


@register("Qwen3ForCausalLM")
class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def get_sliding_window(cls, config) -> int | None:
        return uniform_sliding_window(config)

    def attention_options(self, config) -> dict:
        bias = getattr(config, "attention_bias", False)
        return dict(qkv_bias=bias, o_bias=bias, qk_norm_eps=config.rms_norm_eps)
