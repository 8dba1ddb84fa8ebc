"""PNG plots of benchmark results (matplotlib is an optional extra: `pip install .[bench]`)."""

from __future__ import annotations


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    return plt


def plot_latencies(results: list[dict], path: str) -> bool:
    """Latency distributions (TTFT, TPOT, ITL, E2EL) of one or more runs, and, with several
    runs of different concurrency, output throughput against concurrency."""
    plt = _pyplot()
    if plt is None:
        return False
    several = len(results) > 1
    fig, axes = plt.subplots(1, 5 if several else 4, figsize=(22 if several else 18, 4))
    for ax, key, title in zip(axes, ("ttfts", "tpots", "itls", "e2els"),
                              ("TTFT", "TPOT", "ITL", "E2E latency")):
        for r in results:
            values = [v * 1000 for v in r.get(key, [])]
            if values:
                label = f"conc {r.get('max_concurrency')}" if several else None
                ax.hist(values, bins=40, alpha=0.6, label=label)
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("ms")
        if several:
            ax.legend(fontsize=7)
    if several:
        pts = sorted((r.get("max_concurrency") or r["num_prompts"], r["output_throughput"])
                     for r in results)
        axes[-1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        axes[-1].set_xscale("log", base=2)
        axes[-1].set_title("output tok/s vs concurrency")
        axes[-1].set_xlabel("max concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")
    return True
