"""What this machine can do, and the bound that puts on a serving workload.

Two measured rates: the dense GEMM rate (GFLOP/s, on a matmul of the model's own MLP shape, in
bf16 and in float32, and on tokenmill's AMX kernel where the CPU has AMX; the fastest bounds
compute, as the engine may use any) and the memory copy bandwidth (GB/s). Two bounds on output
tokens/s:

* large batch (compute bound): every prompt and output token costs ``2 * matmul params`` FLOPs
  (the lm_head only for output tokens) plus attention over its context; the workload's FLOPs
  at the GEMM rate give a time, and its output tokens over that time are the bound;
* batch 1 (bandwidth bound): each decode step reads every weight once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


@dataclass
class Machine:
    gemm_gflops: float      # the faster of the two below: the compute bound
    copy_gbps: float        # bytes read + written per second by a large tensor copy
    bf16_gemm_gflops: float = 0.0   # the model's MLP shape at 512 rows, bf16 weights
    fp32_gemm_gflops: float = 0.0   # the same in float32 (faster on CPUs without AMX)
    amx_gemm_gflops: float = 0.0    # the same on tokenmill's AMX kernel (0: no usable AMX)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def best(cls, *samples: "Machine") -> "Machine":
        """The fastest rate of each kind over ``samples``: a bound must hold at the machine's
        best, and on shared hosts the same GEMM measured minutes apart differs up to 2-4x."""
        fields = asdict(samples[0])
        return cls(**{k: max(getattr(m, k) for m in samples) for k in fields})


def _best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_machine(hidden: int, intermediate: int, rows: int = 512,
                    repeats: int = 5) -> Machine:
    import torch

    from tokenmill.worker import cpu_gemm, cpu_kernels

    flops = 2 * rows * hidden * intermediate
    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(rows, hidden, dtype=dtype)
        w = torch.randn(intermediate, hidden, dtype=dtype)
        w_t = w.t().contiguous()
        # each dtype in its faster weight layout ([out, in] for oneDNN's bf16, [in, out] for
        # MKL's fp32), and bf16 also on a weight packed once for oneDNN, as the engine keeps it
        fns = [lambda: torch.nn.functional.linear(a, w), lambda: torch.mm(a, w_t)]
        if dtype == torch.bfloat16 and cpu_gemm.onednn_available():
            packed = cpu_gemm.pack_onednn(w)
            fns.append(lambda: cpu_gemm.onednn_linear(a, packed))
        rates[dtype] = flops / min(_best_of(fn, repeats) for fn in fns) / 1e9
    w = torch.randn(intermediate, hidden, dtype=torch.bfloat16)
    if cpu_kernels.amx_supported(w):
        a, packed = torch.randn(rows, hidden, dtype=torch.bfloat16), cpu_kernels.pack_linear(w)
        rates["amx"] = flops / _best_of(
            lambda: cpu_kernels.linear(a, packed, None, intermediate, amx=True), repeats) / 1e9
    src = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    t = _best_of(lambda: dst.copy_(src), repeats)
    return Machine(gemm_gflops=max(rates.values()), copy_gbps=2 * src.numel() / t / 1e9,
                   bf16_gemm_gflops=rates[torch.bfloat16],
                   fp32_gemm_gflops=rates[torch.float32],
                   amx_gemm_gflops=rates.get("amx", 0.0))


@dataclass
class ModelCost:
    matmul_params: int      # every weight a token multiplies by (lm_head included)
    head_params: int        # the lm_head's share (prompt tokens but the last skip it)
    weight_bytes: int       # what one decode step reads (bf16)
    attn_flops_per_ctx: int  # attention FLOPs per token per token of context

    @classmethod
    def from_config(cls, cfg) -> "ModelCost":
        h, layers = cfg.hidden_size, cfg.num_hidden_layers
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or h // heads
        per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * cfg.intermediate_size
        matmul = layers * per_layer + h * cfg.vocab_size
        embed = 0 if cfg.tie_word_embeddings else h * cfg.vocab_size
        return cls(matmul_params=matmul, head_params=h * cfg.vocab_size,
                   weight_bytes=2 * (matmul + embed), attn_flops_per_ctx=layers * 4 * heads * hd)


def bounds(cost: ModelCost, machine: Machine, input_len: int, output_len: int) -> dict:
    """Output tok/s bounds for requests of ``input_len`` prompt and ``output_len`` output
    tokens (attention counted at each token's mean context)."""
    tokens = input_len + output_len
    mean_ctx = tokens / 2
    # Only sampled positions need logits: the lm_head runs for the outputs, not the prompt.
    flops = (tokens * (2 * (cost.matmul_params - cost.head_params)
                       + cost.attn_flops_per_ctx * mean_ctx)
             + output_len * 2 * cost.head_params)
    large_batch = output_len / (flops / (machine.gemm_gflops * 1e9))
    batch1 = machine.copy_gbps * 1e9 / cost.weight_bytes
    return {"large_batch_out_tok_s": large_batch, "batch1_out_tok_s": batch1,
            "flops_per_request": flops, "weight_bytes": cost.weight_bytes}
