"""The bf16 linear paths side by side, in one run: AMX tiles, the AVX-512 bf16 kernel, MKL's
fp32 GEMM on a float32 weight copy, and oneDNN's bf16 GEMM on a weight packed once (the last two
are the candidates `tokenmill.worker.cpu_gemm` times at start-up on CPUs without AMX).

    python benchmarks/linear_kernels.py [--plot benchmarks/linear-kernels.png]

Shapes: the Qwen2.5-0.5B shape's q|k|v, gate|up and down projections, and the mid test model's
attention and MLP. Prints GFLOP/s (median of 7) per path and rows, and AMX over the best other.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenmill.worker import cpu_gemm, cpu_kernels

SHAPES = [(1152, 896), (9728, 896), (896, 4864), (1024, 512), (3072, 512)]   # (N, K)
ROWS = [1, 2, 4, 8, 16, 32, 64, 512, 2048]


def median_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plot", default=None, help="write a PNG of GFLOP/s against rows")
    ap.add_argument("--result-file", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    probe = torch.zeros(32, 32, dtype=torch.bfloat16)
    if not cpu_kernels.linear_supported(probe):
        raise SystemExit("the native bf16 linear is not available here")
    amx = cpu_kernels.amx_supported(probe)
    results = []
    for n, k in SHAPES:
        w = torch.randn(n, k).to(torch.bfloat16)
        packed, w_t = cpu_kernels.pack_linear(w), w.float().t().contiguous()
        onednn = cpu_gemm.pack_onednn(w)
        for m in ROWS:
            x = torch.randn(m, k).to(torch.bfloat16)
            paths = {"avx512_bf16": lambda: cpu_kernels.linear(x, packed, None, n),
                     "fp32_mkl": lambda: (x.float() @ w_t).to(torch.bfloat16),
                     "onednn_packed": lambda: cpu_gemm.onednn_linear(x, onednn)}
            if amx:
                paths["amx"] = lambda: cpu_kernels.linear(x, packed, None, n, amx=True)
            rate = {p: 2 * m * n * k / median_seconds(f) / 1e9 for p, f in paths.items()}
            row = {"n": n, "k": k, "rows": m, **{f"{p}_gflops": round(r) for p, r in rate.items()}}
            if amx:
                row["amx_over_best_other"] = round(
                    rate["amx"] / max(v for p, v in rate.items() if p != "amx"), 2)
            results.append(row)
            print("  ".join(f"{key}={val}" for key, val in row.items()), flush=True)
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "amx": amx, "results": results},
                      f, indent=2)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(SHAPES), figsize=(4 * len(SHAPES), 3.6), sharey=True)
        for ax, (n, k) in zip(axes, SHAPES):
            rows = [r for r in results if (r["n"], r["k"]) == (n, k)]
            for path in ("amx", "avx512_bf16", "fp32_mkl", "onednn_packed"):
                if f"{path}_gflops" in rows[0]:
                    ax.plot([r["rows"] for r in rows], [r[f"{path}_gflops"] for r in rows],
                            marker="o", label=path)
            ax.set_xscale("log", base=2)
            ax.set_title(f"N={n} K={k}")
            ax.set_xlabel("rows")
        axes[0].set_ylabel("GFLOP/s")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
