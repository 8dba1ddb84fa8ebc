"""Llama (1, 2, 3, 3.1+): pre-norm decoder blocks of grouped-query attention and a SwiGLU MLP.

    x = embed(tokens)
    for each layer:  x = x + attn(rmsnorm(x));  x = x + mlp(rmsnorm(x))
    logits = lm_head(rmsnorm(x))

(In code each residual add is fused into the norm after it: a layer takes and returns the
last sublayer's output and the residual stream before it, as vLLM's layers do.)

Mistral, Qwen2 and Qwen3 are this model with a few switches; their files subclass these
classes and override ``attention_options`` / ``get_sliding_window``.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.models.layers import (Attention, GatedMLP, Linear, RMSNorm, RotaryEmbedding,
                                     rope_parameters)
from tokenmill.models.native_decode import NativeDecodeStack
from tokenmill.models.registry import CausalLM, register
from tokenmill.worker.attention import AttentionMetadata


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, attention: Attention):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size,
                            bias=getattr(config, "mlp_bias", False))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual stream before it) from the previous layer's pair."""
        if residual is None:                     # the first layer: x is the embedding
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config, layers: list[LlamaDecoderLayer], head_dim: int):
        super().__init__()
        # NOTE: an explicit weight skips nn.Embedding's normal_() init, which on the meta
        # device runs torch._refs and imports torch._dynamo: 1.6 s of every start-up.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim, rope_parameters(config),
                                          config.max_position_embeddings)
        self.native_decode: NativeDecodeStack | None = None   # set by use_cpu_gemm

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                         # x: [T, hidden]
        cos, sin = self.rotary_emb(positions, x.dtype)           # cos, sin: [T, 1, D]
        if self.native_decode is not None and self.native_decode.applies(x, meta):
            return self.native_decode(x, cos, sin, kv_caches, meta)
        return self.run_layers(x, cos, sin, kv_caches, meta)

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """The decoder layers and the final norm, from the embeddings x [T, hidden]."""
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta)
        return self.norm(x, residual)[0]


@register("LlamaForCausalLM")
class LlamaForCausalLM(CausalLM):
    def __init__(self, config):
        super().__init__(config)
        layers = [LlamaDecoderLayer(config, self.make_attention(config))
                  for _ in range(self.num_layers)]
        self.model = LlamaModel(config, layers, self.head_dim)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def use_cpu_gemm(self, plan) -> int:
        extra = super().use_cpu_gemm(plan)
        self.model.native_decode = NativeDecodeStack.build(self.model, plan)
        return extra

    def attention_options(self, config) -> dict:
        """Keyword arguments of ``Attention`` that differ between families."""
        bias = getattr(config, "attention_bias", False)
        return dict(qkv_bias=bias, o_bias=bias)

    def make_attention(self, config) -> Attention:
        return Attention(config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                         **self.attention_options(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)
