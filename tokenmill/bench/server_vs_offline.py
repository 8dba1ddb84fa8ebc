"""Server overhead: the same workload through `tokenmill serve` (HTTP, streaming, all requests
at once) and through the offline `LLM.generate`, in one run; reports both and the ratio."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

SERVER_KEYS = ("duration", "completed", "failed", "output_throughput", "mean_ttft_ms",
               "mean_tpot_ms", "total_output_tokens")


def _requests(wl):
    from tokenmill.bench.serve import BenchRequest

    return [BenchRequest(p, len(p), o) for p, o in zip(wl.prompts, wl.output_lens)]


def run(args) -> dict:
    from tokenmill.bench.peers import TokenmillPeer
    from tokenmill.bench.serve import client_args, run_benchmark
    from tokenmill.bench.throughput import TokenmillRunner, fresh_workloads

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if model is None:
        from tokenmill.testing.checkpoints import make_checkpoint

        model = str(make_checkpoint(Path(tmp.name) / "mid", "llama", size="mid",
                                    dtype=args.dtype))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model, local_files_only=True).vocab_size
    warm, wls = fresh_workloads(args.num_prompts, vocab, tuple(args.input_len),
                                tuple(args.output_len), args.seed, args.runs)
    report = {"command": "tokenmill bench server-vs-offline " + " ".join(sys.argv[3:]),
              "model": args.model or "random mid llama", "dtype": args.dtype,
              "num_prompts": args.num_prompts, "output_tokens": wls[0].num_output_tokens,
              "date": time.strftime("%Y-%m-%d")}
    offline = TokenmillRunner(model, args.dtype, max_num_seqs=args.max_num_seqs)
    offline.warm_up(warm)

    offline_runs, server_runs = [], []
    server = TokenmillPeer(Path(tmp.name), model,
                           ("--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs)))
    try:
        with server as url:
            # tokenmill serves the folder under its path
            bench_args = client_args(url, model, seed=args.seed)
            asyncio.run(run_benchmark(bench_args, _requests(warm)))
            # NOTE: alternate the two paths so that a noisy neighbour hits both alike.
            for w in wls:
                offline_runs.append(offline.run(w, progress=True))
                result, _ = asyncio.run(run_benchmark(bench_args, _requests(w)))
                server_runs.append({k: result[k] for k in SERVER_KEYS})
    finally:
        tmp.cleanup()
    report["offline"] = {"output_tok_s": median(r["output_tok_s"] for r in offline_runs),
                         "runs": offline_runs}
    report["server"] = {"output_throughput": median(r["output_throughput"]
                                                    for r in server_runs),
                        "failed": sum(r["failed"] for r in server_runs), "runs": server_runs}
    report["server_over_offline"] = (report["server"]["output_throughput"]
                                     / report["offline"]["output_tok_s"])
    report["ratio_per_run"] = [s["output_throughput"] / o["output_tok_s"]
                               for o, s in zip(offline_runs, server_runs)]
    return report


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Model folder (default: random 'mid' llama).")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="timed runs of each path (medians)")
    p.add_argument("--input-len", type=int, nargs=2, default=[16, 384])
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None)


def run_from_args(args) -> int:
    report = run(args)
    print(json.dumps(report, indent=2))
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(report, indent=2))
    return 0 if report["server"]["failed"] == 0 else 1
