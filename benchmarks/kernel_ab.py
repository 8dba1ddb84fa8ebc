"""The CPU kernels of a git revision against the working tree's, in one engine, step by step.

    python benchmarks/kernel_ab.py --base HEAD~1 [--batch 1 4 16 64] [--plot ab.png]

Both kernel libraries are built (``worker/csrc`` at ``--base``, and as it is now) and loaded
into one process; the engine swaps between them on every decode step, so each pair of
adjacent steps shares the host's state of the moment. On this noisy kind of machine that is
what makes a 5% change visible: separate runs drift by more than that. Reports, per batch
size, the median step time of each and the median of the paired ratios base / new (above 1:
the working tree is faster), with its quartiles.

The model is the Qwen2.5-0.5B shape with random weights (made once under ``--work-dir``, as
``tokenmill bench compare`` does), bf16, 128-token prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from tqdm import tqdm  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.compare import _default_model  # noqa: E402
from tokenmill.worker import cpu_kernels  # noqa: E402

CSRC = "tokenmill/worker/csrc"


def build_at(rev: str, into: Path):
    """The kernel library from ``worker/csrc`` at git revision ``rev``, loaded."""
    repo = Path(__file__).resolve().parent.parent
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{CSRC}"], cwd=repo,
                           check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        (into / name).write_bytes(subprocess.run(["git", "show", f"{rev}:{CSRC}/{name}"],
                                                 cwd=repo, check=True,
                                                 capture_output=True).stdout)
    sources, headers = cpu_kernels.SOURCES, cpu_kernels.HEADERS
    cpu_kernels.SOURCES = sorted(into.glob("*.c"))
    cpu_kernels.HEADERS = sorted(into.glob("*.h"))
    cpu_kernels._loaded.clear()
    try:
        return cpu_kernels._load()
    finally:
        cpu_kernels.SOURCES, cpu_kernels.HEADERS = sources, headers
        cpu_kernels._loaded.clear()


def measure(llm: LLM, libs: dict, batch: int, waves: int, output_len: int, rng, bar) -> dict:
    eng = llm.engine
    times = {name: [] for name in libs}
    order = list(libs)
    for wave in range(waves):
        for i in range(batch):
            eng.add_request(f"b{batch}-w{wave}-{i}",
                            {"prompt_token_ids": [rng.randrange(1000, 100_000) for _ in range(128)]},
                            SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
        step = 0
        while eng.has_unfinished_requests():
            name = order[step % 2]
            cpu_kernels._loaded["lib"] = libs[name]
            t0 = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - t0
            # The prompt step and the last one (fewer rows as requests finish) are not decode
            # steps of this batch size.
            if step >= 1 and eng.has_unfinished_requests():
                times[name].append(dt)
            step += 1
            bar.update(1)
    pairs = sorted(b / n for b, n in zip(times["base"], times["new"]))
    q = len(pairs) // 4
    return {"batch": batch, "steps": len(pairs),
            "base_ms": statistics.median(times["base"]) * 1e3,
            "new_ms": statistics.median(times["new"]) * 1e3,
            "speedup": statistics.median(pairs), "speedup_q1": pairs[q],
            "speedup_q3": pairs[-q - 1], "ratios": pairs}


def plot(results: list[dict], base: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.boxplot([r["ratios"] for r in results], showfliers=False)
    ax.set_xticks(range(1, len(results) + 1), [str(r["batch"]) for r in results])
    ax.axhline(1.0, color="gray", ls="--")
    ax.set_xlabel("decode rows per step")
    ax.set_ylabel(f"step time {base} / working tree")
    ax.set_title("CPU kernels: paired decode steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="HEAD", help="git revision of the baseline kernels")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--waves", type=int, default=4, help="batches of requests per size")
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "tokenmill-bench"))
    ap.add_argument("--result-file", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    new = cpu_kernels._load()
    if new is None or not cpu_kernels.decode_layers_supported():
        raise SystemExit("the native CPU kernels are not available here")
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": build_at(args.base, Path(tmp)), "new": new}
    cpu_kernels._loaded["lib"] = new
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    llm = LLM(model=_default_model(Path(args.work_dir), "bfloat16"), dtype="bfloat16",
              show_progress=False)
    rng = random.Random(0)
    results = []
    with tqdm(total=sum(args.waves * args.output_len for _ in args.batch), unit="step") as bar:
        for b in args.batch:
            r = measure(llm, libs, b, args.waves, args.output_len, rng, bar)
            results.append(r)
            tqdm.write(f"batch {b:3d}: {args.base} {r['base_ms']:.1f} ms, working tree "
                       f"{r['new_ms']:.1f} ms; paired speedup {r['speedup']:.3f} "
                       f"(quartiles {r['speedup_q1']:.3f}-{r['speedup_q3']:.3f}, "
                       f"{r['steps']} pairs)")
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "base": args.base,
                       "results": [{k: v for k, v in r.items() if k != "ratios"}
                                   for r in results]}, f, indent=2)
    if args.plot:
        plot(results, args.base, args.plot)


if __name__ == "__main__":
    main()
