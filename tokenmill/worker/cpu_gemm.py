"""Which bf16 GEMM serves the large matmuls on this CPU, chosen by measuring it.

The fastest path depends on the CPU more than on the code (BENCHMARKS.md):

* Xeon with AMX: tokenmill's AMX kernel, 1.5-8x anything else from 16 rows;
* Xeon without AMX (oneDNN capped at AVX-512 bf16): MKL's fp32 GEMM on a float32 weight copy,
  1.3-2x oneDNN's bf16 one;
* AMD EPYC (Zen 4, AVX-512 bf16): oneDNN's bf16 GEMM on a packed weight, 2.5-5x MKL's fp32 one,
  which does not take its fast paths on AMD.

So on a CPU without AMX, start-up times the two candidates on one matmul (about 50 ms) and
keeps the faster one's weight copies only. Few rows are bound by reading the weight and stay on
the packed bf16 kernel either way (``layers.Linear``). ``TOKENMILL_CPU_GEMM`` (``amx``,
``fp32``, ``onednn``; default ``auto``) skips the measurement.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from tokenmill.worker import cpu_kernels

logger = logging.getLogger(__name__)

PATHS = ("amx", "fp32", "onednn")
# From these rows on the large path beats the packed bf16 kernel on weights not in cache
# (AMX: 1.06-1.16x at 6 rows; fp32: about even at 32, ahead from 64; oneDNN on the EPYC: even
# from 64 to 192 rows on the Qwen2.5-0.5B shapes, ahead from 256). Below, a decode-only step
# also runs as one native call (models/native_decode.py), which is why oneDNN starts late.
MIN_ROWS = {"amx": 6, "fp32": 32, "onednn": 128}
# The measured matmul: 64 rows (a decode step under load) through a 4096 x 1024 weight (8 MB,
# the size of a small model's MLP projection).
PROBE_ROWS, PROBE_OUT, PROBE_IN = 64, 4096, 1024


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


def pack_onednn(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] reordered once into oneDNN's blocked layout (``F.linear`` does this on
    every call). The batch-size hint only tunes the packing; any number of rows works."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) from ``pack_onednn(W)``: bit-identical to ``F.linear(x, W, bias)``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@dataclass(frozen=True)
class CpuGemmPlan:
    large: str                                   # one of PATHS
    min_rows: int                                # the large path from this many rows on
    gflops: dict[str, float] = field(default_factory=dict)   # what the choice measured

    def describe(self) -> str:
        rates = ", ".join(f"{k} {v:.0f}" for k, v in self.gflops.items())
        return f"{self.large} from {self.min_rows} rows" + (f" (GFLOP/s: {rates})" if rates
                                                             else "")


def _median_seconds(fns: dict, repeats: int = 5) -> dict[str, float]:
    """Each fn's median time, the candidates interleaved so that a noisy moment hits all."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[repeats // 2] for name, ts in times.items()}


def measure(rows: int = PROBE_ROWS, out_features: int = PROBE_OUT,
            in_features: int = PROBE_IN) -> dict[str, float]:
    """GFLOP/s of the fp32 and oneDNN paths on one bf16 matmul, as ``Linear`` runs them."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    w_t32 = w.float().t().contiguous()
    fns = {"fp32": lambda: torch.mm(x.float(), w_t32).to(torch.bfloat16)}
    if onednn_available():
        packed = pack_onednn(w)
        fns["onednn"] = lambda: onednn_linear(x, packed)
    flops = 2 * rows * out_features * in_features
    return {name: flops / t / 1e9 for name, t in _median_seconds(fns).items()}


def choose() -> CpuGemmPlan:
    """The plan for bf16 matmuls on this CPU (see the module docstring)."""
    forced = os.environ.get("TOKENMILL_CPU_GEMM", "auto").lower()
    if forced in PATHS:
        return CpuGemmPlan(forced, MIN_ROWS[forced])
    if forced != "auto":
        raise ValueError(f"TOKENMILL_CPU_GEMM={forced!r}: expected auto or one of {PATHS}")
    if cpu_kernels.amx_supported(torch.zeros(32, 32, dtype=torch.bfloat16)):
        return CpuGemmPlan("amx", MIN_ROWS["amx"])
    rates = measure()
    large = max(rates, key=rates.get)
    return CpuGemmPlan(large, MIN_ROWS[large], rates)
