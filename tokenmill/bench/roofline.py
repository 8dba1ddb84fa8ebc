"""What this machine can do, and the bound that puts on a serving workload.

Two measured rates: the dense bf16 GEMM rate (GFLOP/s, on matmuls of the model's own shapes)
and the memory copy bandwidth (GB/s). Two bounds on output tokens/s:

* large batch (compute bound): every prompt and output token costs ``2 * matmul params`` FLOPs
  plus attention over its context; the workload's FLOPs at the GEMM rate give a time, and its
  output tokens over that time are the bound;
* batch 1 (bandwidth bound): each decode step reads every weight once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


@dataclass
class Machine:
    gemm_gflops: float      # bf16, the model's MLP shape at 512 rows
    copy_gbps: float        # bytes read + written per second by a large tensor copy

    def to_dict(self) -> dict:
        return asdict(self)


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

    a = torch.randn(rows, hidden, dtype=torch.bfloat16)
    w = torch.randn(intermediate, hidden, dtype=torch.bfloat16)
    t = _best_of(lambda: torch.nn.functional.linear(a, w), repeats)
    gemm = 2 * rows * hidden * intermediate / t / 1e9
    src = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    t = _best_of(lambda: dst.copy_(src), repeats)
    return Machine(gemm_gflops=gemm, copy_gbps=2 * src.numel() / t / 1e9)


@dataclass
class ModelCost:
    matmul_params: int      # every weight a token multiplies by (lm_head included)
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
        return cls(matmul_params=matmul, weight_bytes=2 * (matmul + embed),
                   attn_flops_per_ctx=layers * 4 * heads * hd)


def bounds(cost: ModelCost, machine: Machine, input_len: int, output_len: int) -> dict:
    """Output tok/s bounds for requests of ``input_len`` prompt and ``output_len`` output
    tokens (attention counted at each token's mean context)."""
    tokens = input_len + output_len
    mean_ctx = tokens / 2
    flops = tokens * (2 * cost.matmul_params + cost.attn_flops_per_ctx * mean_ctx)
    large_batch = output_len / (flops / (machine.gemm_gflops * 1e9))
    batch1 = machine.copy_gbps * 1e9 / cost.weight_bytes
    return {"large_batch_out_tok_s": large_batch, "batch1_out_tok_s": batch1,
            "flops_per_request": flops, "weight_bytes": cost.weight_bytes}
