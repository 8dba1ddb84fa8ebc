"""The decoder stack of a decode-only CPU step in one native call.

``LlamaModel`` runs layer by layer in Python, and each layer is some thirty kernel calls and
tensor views; on a small model at batch 1 that glue is ~10% of the step (BENCHMARKS.md).
``NativeDecodeStack`` hands the same kernels, in the same order, to one C function
(``csrc/decode_layers.c``), so a step it takes gives bit-identical hidden states.

It takes a step when every row is a decode served by the native attention kernel, the model
is bf16 on the CPU fast paths (``use_cpu_gemm``), and the rows are few enough that each Linear
would pick a packed-weight kernel (the native one, or AMX where the plan says so); otherwise
the Python layers run.
"""

from __future__ import annotations

import torch

from tokenmill.worker import cpu_kernels
from tokenmill.worker.attention import AttentionMetadata


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeDecodeStack:
    def __init__(self, model, plan):
        """``model``: a ``LlamaModel`` whose Linears took ``plan`` (see ``build``)."""
        self.model = model
        first = model.layers[0]
        attn = first.self_attn
        amx = plan.large == "amx"
        # Below min_rows every Linear takes its native kernel; from there the plan's large path,
        # which is only ours (and so only runs here) when it is AMX.
        self.max_rows = None if amx else plan.min_rows
        self.dims = cpu_kernels.DecodeDims(
            num_layers=len(model.layers), hidden=first.input_layernorm.weight.shape[0],
            inter=first.mlp.down_proj.in_features, num_heads=attn.num_heads,
            num_kv_heads=attn.num_kv_heads, head_dim=attn.head_dim,
            amx_min_rows=plan.min_rows if amx else 0, eps=first.input_layernorm.eps,
            qk_eps=attn.q_norm.eps if attn.q_norm is not None else 0.0, scale=attn.scale)
        self.layers = None
        self.cache_ptrs: list[int] = []

    @classmethod
    def build(cls, model, plan) -> NativeDecodeStack | None:
        """The stack for ``model`` (a ``LlamaModel`` after ``use_cpu_gemm(plan)``), or None
        where the native call cannot serve it."""
        if not cpu_kernels.decode_layers_supported() or not len(model.layers):
            return None
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(not lin.cpu_gemm or lin.weight_native is None
                   or (plan.large == "amx" and lin.large != "amx") for lin in linears):
                return None
            norms = [layer.input_layernorm, layer.post_attention_layernorm, model.norm]
            norms += [n for n in (attn.q_norm, attn.k_norm) if n is not None]
            if any(n.weight.dtype != torch.bfloat16 for n in norms):
                return None
        if not cpu_kernels.supports(torch.device("cpu"), torch.bfloat16, attn.num_heads,
                                    attn.num_kv_heads, attn.head_dim):
            return None
        return cls(model, plan)

    def applies(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        T = x.shape[0]
        return (meta.decode_table is not None and meta.num_decode_tokens == T
                and not meta.prefills and x.dtype == torch.bfloat16
                and (self.max_rows is None or T < self.max_rows))

    def _layer_structs(self, kv_caches: list[torch.Tensor]):
        ptrs = [c.data_ptr() for c in kv_caches]
        if ptrs != self.cache_ptrs:   # first step, or a new cache
            layers = (cpu_kernels.DecodeLayer * len(ptrs))()
            for s, layer, cache in zip(layers, self.model.layers, kv_caches, strict=True):
                attn, mlp = layer.self_attn, layer.mlp
                s.ln1, s.ln2 = _ptr(layer.input_layernorm.weight), \
                    _ptr(layer.post_attention_layernorm.weight)
                s.wqkv, s.wo = _ptr(attn.qkv_proj.weight_native), _ptr(attn.o_proj.weight_native)
                s.wgu, s.wd = _ptr(mlp.gate_up_proj.weight_native), \
                    _ptr(mlp.down_proj.weight_native)
                s.bqkv, s.bo = _ptr(attn.qkv_proj.bias_fp32), _ptr(attn.o_proj.bias_fp32)
                s.bgu, s.bd = _ptr(mlp.gate_up_proj.bias_fp32), _ptr(mlp.down_proj.bias_fp32)
                s.q_norm = _ptr(None if attn.q_norm is None else attn.q_norm.weight)
                s.k_norm = _ptr(None if attn.k_norm is None else attn.k_norm.weight)
                s.cache = cache.data_ptr()
            head = kv_caches[0]
            self.dims.num_blocks, self.dims.block_size = head.shape[1], head.shape[2]
            self.layers, self.cache_ptrs = layers, ptrs
        return self.layers

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """Final-normed hidden states [T, hidden], as ``LlamaModel.forward`` returns them."""
        T, D = x.shape[0], cos.shape[-1]
        layers = self._layer_structs(kv_caches)
        self.dims.window = meta.sliding_window or 0
        return cpu_kernels.decode_layers(
            self.dims, layers, self.model.norm.weight, x.contiguous(),
            cos.reshape(T, D).contiguous(), sin.reshape(T, D).contiguous(),
            meta.slot_mapping, meta.decode_table, meta.decode_lens)
