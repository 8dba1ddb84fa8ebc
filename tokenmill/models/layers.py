"""Building blocks shared by the model families: RMSNorm, rotary embedding, the gated MLP and
the attention layer that calls the paged attention backend.

Numerics follow Hugging Face's Llama exactly (float32 norms cast back, cos/sin computed in
float32 then cast to the activation dtype), so float32 outputs match bit for bit up to matmul
ordering and bfloat16 outputs round the same way.

q/k/v and gate/up are fused into one matmul each (fewer, larger GEMMs are faster, on CPU most of
all). ``FusedLinear`` records where each checkpoint tensor goes; the loader uses that, and
``forward`` never sees a checkpoint name. rope runs on q and k together and takes its sign
from the sin table, to keep the ops per layer few (small decode batches pay per op).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.worker import cpu_gemm, cpu_kernels
from tokenmill.worker.attention import AttentionMetadata, paged_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """rmsnorm(x); with ``residual``, (rmsnorm(x + residual), x + residual): the residual
        add fused into the norm that follows it (one pass on CPU in bf16)."""
        if self.weight.dtype == x.dtype and cpu_kernels.elementwise_supported(x):
            d = x.shape[-1]
            y, r = cpu_kernels.add_rmsnorm(
                x.reshape(-1, d), None if residual is None else residual.reshape(-1, d),
                self.weight, self.eps)
            return y.view(x.shape) if residual is None else (y.view(x.shape), r.view(x.shape))
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: as HF: normalize in float32, cast back, *then* scale (bf16 rounding matches).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_parameters(config) -> dict:
    """The rope settings of a config as one flat dict with ``rope_type`` and ``rope_theta``.

    transformers 5 keeps them in ``config.rope_parameters`` (``rope_scaling`` is an alias, and an
    old-style ``rope_theta`` + ``rope_scaling`` config.json is folded in on load); configs built
    by other means may still carry the old attributes, so read both.
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                  or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return params


def rope_inv_freq(params: dict, head_dim: int, max_position: int) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies for ``params`` (see ``rope_parameters``)."""
    rope_type = params["rope_type"]
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise NotImplementedError("partial rotary embeddings are not supported")
    # NOTE: explicit device: a model built under `with torch.device("meta")` still gets real
    # frequencies (they are not in the checkpoint, so the loader could not fill them in).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (params["rope_theta"] ** exponents)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params, max_position)
    raise NotImplementedError(
        f"rope type {rope_type!r} is not supported (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict, max_position: int) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params.get("original_max_position_embeddings") or max_position
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of a step, computed once per forward for all layers."""

    def __init__(self, head_dim: int, params: dict, max_position: int):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(params, head_dim, max_position),
                             persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """-> cos [T, 1, D], signed sin [T, 1, D] (see ``apply_rope``), in ``dtype``."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]   # [T, D/2]
        cos = torch.cat((freqs, freqs), dim=-1).cos()                 # [T, D]
        sin = freqs.sin()
        # rotate_half(x) * sin == swap_halves(x) * cat(-sin, sin): the sign moves into the
        # table once per step instead of a neg per layer (exact: negation does not round).
        sin = torch.cat((-sin, sin), dim=-1)
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) (neox style: the two
    halves of D form the rotated pairs); ``sin`` carries rotate_half's sign.
    x: [T, H, D]; cos, sin: [T, 1, D]."""
    if cos.dtype == x.dtype and cpu_kernels.elementwise_supported(x):
        return cpu_kernels.rope(x, cos, sin)
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)   # [T, H, D]
    return x * cos + swapped * sin


# ---------------------------------------------------------------------------------------------
# Linear layers


class Linear(nn.Linear):
    """``nn.Linear`` with CPU fast paths for bfloat16 weights (``use_cpu_gemm`` turns them on).

    ``F.linear`` in bf16 repacks the weight for oneDNN on every call, so the fast paths keep
    packed copies instead (``worker.cpu_gemm`` picks the large path per CPU, BENCHMARKS.md):

    * from ``plan.min_rows`` rows on, ``plan.large``: the native AMX kernel, MKL's fp32 GEMM
      on an ``[in, out]`` float32 copy, or oneDNN's bf16 GEMM on a weight packed once in its
      blocked layout (bit-identical to ``F.linear``). All accumulate in fp32 and round to bf16
      once (bf16 x bf16 products are exact in fp32), so they differ in summation order only;
    * below, few rows are bound by reading the weight: the native kernel
      (``cpu_kernels.linear``, AVX-512 bf16) on the packed copy streams the weight at ~20 GB/s
      where oneDNN reaches ~16; without it, the oneDNN-packed weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.cpu_gemm = False
        self.large, self.large_min_rows = "", 0
        self.weight_t_fp32 = None
        self.weight_packed = None
        self.weight_native = None

    @staticmethod
    def _paths(weight: torch.Tensor, large: str) -> tuple[str, bool, bool]:
        """(the large path this weight can take, keep a native copy, keep a oneDNN copy)."""
        native = cpu_kernels.linear_supported(weight)
        onednn_ok = cpu_gemm.onednn_available()
        if large == "amx" and not cpu_kernels.amx_supported(weight):
            large = "fp32"
        if large == "onednn" and not onednn_ok:
            large = "fp32"
        return large, native, onednn_ok and (large == "onednn" or not native)

    @classmethod
    def cpu_gemm_bytes(cls, weight: torch.Tensor, large: str) -> int:
        """Bytes ``use_cpu_gemm`` adds for ``weight`` with ``large`` as the large path."""
        large, native, onednn = cls._paths(weight, large)
        copies = 2 * (native + onednn) + 4 * (large == "fp32")
        return weight.numel() * copies

    def use_cpu_gemm(self, plan) -> None:
        """Keep the copies the fast paths of ``plan`` (a ``cpu_gemm.CpuGemmPlan``) need."""
        weight = self.weight.detach()
        self.large, native, onednn = self._paths(weight, plan.large)
        self.cpu_gemm, self.large_min_rows = True, plan.min_rows
        self.bias_fp32 = None if self.bias is None else self.bias.detach().float()
        self.bias_plain = None if self.bias is None else self.bias.detach()
        if self.large == "fp32":
            self.weight_t_fp32 = weight.float().t().contiguous()
        if native:
            self.weight_native = cpu_kernels.pack_linear(weight)
        if onednn:
            self.weight_packed = cpu_gemm.pack_onednn(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: [T, in]
        if not self.cpu_gemm:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] >= self.large_min_rows:
            if self.large == "amx":
                return cpu_kernels.linear(x, self.weight_native, self.bias_fp32,
                                          self.out_features, amx=True)
            if self.large == "fp32":
                x32 = x.float()
                if self.bias_fp32 is None:
                    return torch.mm(x32, self.weight_t_fp32).to(x.dtype)
                return torch.addmm(self.bias_fp32, x32, self.weight_t_fp32).to(x.dtype)
            return self._onednn(x)
        if self.weight_native is not None:
            return cpu_kernels.linear(x, self.weight_native, self.bias_fp32, self.out_features)
        return self._onednn(x)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_packed is None:
            return F.linear(x, self.weight, self.bias)
        return cpu_gemm.onednn_linear(x, self.weight_packed, self.bias_plain)


class FusedLinear(Linear):
    """One Linear whose output rows are several checkpoint tensors stacked (q|k|v, gate|up).

    ``shards`` maps a checkpoint sub-module name (``"q_proj"``) to its row slice; the loader
    copies each checkpoint tensor into ``weight[rows]`` (and ``bias[rows]``).
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shards: dict[str, slice] = {}
        start = 0
        for name, size in shard_sizes.items():
            self.shards[name] = slice(start, start + size)
            start += size


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = FusedLinear(
            hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size}, bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)                     # [T, 2I]
        if cpu_kernels.elementwise_supported(gate_up):
            return self.down_proj(cpu_kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)                # [T, I] each
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads, rope, and a paged KV cache.

    ``qk_norm_eps`` adds Qwen3's per-head RMSNorm on q and k, applied before rope.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm_eps: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = FusedLinear(
            hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}, qkv_bias)
        self.o_proj = Linear(q_size, hidden_size, bias=o_bias)
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T, H = x.shape[0], self.num_heads
        qkv = self.qkv_proj(x).view(T, H + 2 * self.num_kv_heads, self.head_dim)
        qk, v = qkv[:, :H + self.num_kv_heads], qkv[:, H + self.num_kv_heads:]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])), dim=1)
        # NOTE: q and k heads side by side get rope in one pass (half the per-layer ops).
        qk = apply_rope(qk, cos, sin)                       # qk: [T, H + Hkv, D]
        q, k = qk[:, :H], qk[:, H:]                         # q: [T, H, D]; k, v: [T, Hkv, D]
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)  # [T, H, D]
        return self.o_proj(o.reshape(T, H * self.head_dim))
