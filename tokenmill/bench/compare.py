"""`tokenmill bench compare`: tokenmill's server, llama.cpp's llama-server and transformers'
batched ``generate`` on the same checkpoint and the same requests, in one run.

For each concurrency level (default 1, 4, 16, 64) both servers get the same random prompts
(token ids) through `bench serve`'s client, at most that many in flight; transformers runs the
same prompts offline in static batches of that size. Then the `shared-prefix` dataset on
tokenmill with and without prefix caching (TTFT ratio). The report (JSON, markdown table, PNG)
puts every figure next to the roofline of `roofline.py`, measured on this machine in the same
run. With no ``--model``, a random-weight checkpoint with Qwen2.5-0.5B's shape is made.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

from tokenmill.bench import peers
from tokenmill.bench.roofline import Machine, ModelCost, bounds, measure_machine

CLIENT_TIMEOUT_S = 1800.0   # one request of a 64-client level can queue for minutes


def _dataset(args, vocab: int, n: int, seed: int, shared_prefix: bool = False,
             output_len: int | None = None):
    from tokenmill.bench.serve import make_dataset

    ns = argparse.Namespace(dataset="shared-prefix" if shared_prefix else "random",
                            dataset_path=None, vocab_size=vocab, seed=seed, num_prompts=n,
                            random_input_len=args.input_len,
                            random_output_len=output_len or args.output_len,
                            random_range_ratio=0.0, shared_prefix_len=args.shared_prefix_len,
                            endpoint="completions")
    return make_dataset(ns, None)


def _seed(args, purpose: str) -> int:
    """A dataset seed of its own for each use (warm-up, each level, shared prefix).
    NOTE: not ``seed - 1`` and ``seed + c``: ``random.Random`` seeds with abs(int), so the
    warm-up's seed -1 drew level 1's prompts, and the peers answered two of its four requests
    from their prompt caches."""
    digest = hashlib.sha256(f"{args.seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _prompts_at(concurrency: int, args) -> int:
    return max(args.min_prompts, args.prompts_per_client * concurrency)


def _level_requests(args, vocab: int, concurrency: int, run: int = 0):
    """A level's requests for one run (transformers' single run gets the servers' first)."""
    return _dataset(args, vocab, _prompts_at(concurrency, args),
                    _seed(args, f"level-{concurrency}/{run}"))


def _summary(result: dict) -> dict:
    keys = ("completed", "failed", "duration", "output_throughput", "mean_ttft_ms",
            "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms")
    return {k: result[k] for k in keys}


def run_server_levels(peer_list: list, model_name: str, vocab: int, args) -> tuple[dict, dict]:
    """Every level on every server, the servers taking turns, ``args.repeats`` times with the
    order flipped each time and fresh prompts each time (a repeated prompt would come from the
    prompt caches). A level's figures are its run of median output throughput.

    NOTE: both servers stay up and alternate: this host's speed drifts by 20% over minutes,
    and one server measured 10 minutes after the other compared the moments, not the servers
    (llama-server's batch-1 TPOT was 31.3 ms in one run, 25.4 in the next)."""
    from tokenmill.bench.serve import client_args, run_benchmark

    def bench(url, reqs, c=None):
        return asyncio.run(run_benchmark(client_args(url, model_name, seed=args.seed,
                                                     max_concurrency=c,
                                                     timeout=CLIENT_TIMEOUT_S), reqs))[0]

    runs: dict = {}
    skipped: dict = {}
    with contextlib.ExitStack() as stack:
        urls = {}
        for peer in peer_list:
            try:
                urls[peer.name] = stack.enter_context(peer)
            except peers.PeerUnavailable as e:
                skipped[peer.name] = str(e)
                continue
            bench(urls[peer.name], _dataset(args, vocab, 2, _seed(args, "warm-up")))
        for c in args.concurrency:
            for rep in range(args.repeats):
                reqs = _level_requests(args, vocab, c, rep)
                for name in (list(urls) if rep % 2 == 0 else list(urls)[::-1]):
                    result = _summary(bench(urls[name], reqs, c))
                    runs.setdefault(name, {}).setdefault(c, []).append(result)
                    print(f"{name} @ {c} (run {rep + 1}): {result['output_throughput']:.1f} out "
                          f"tok/s, TTFT {result['mean_ttft_ms']:.0f} ms, TPOT "
                          f"{result['mean_tpot_ms']:.1f} ms", flush=True)
    return {name: {c: median_run(rs) for c, rs in levels.items()}
            for name, levels in runs.items()}, skipped


def median_run(rs: list[dict]) -> dict:
    """The run of median output throughput (the lower middle one of an even count), with every
    run's throughput beside it."""
    mid = sorted(rs, key=lambda r: r["output_throughput"])[(len(rs) - 1) // 2]
    return {**mid, "runs_output_throughput": [r["output_throughput"] for r in rs]}


def run_transformers_levels(model: str, vocab: int, args) -> dict:
    from tokenmill.bench.throughput import TransformersRunner, Workload

    out = {}
    runner = None
    for c in args.concurrency:
        reqs = _level_requests(args, vocab, c)
        wl = Workload([r.prompt for r in reqs], [r.output_len for r in reqs])
        if runner is None:   # loaded once; only the static batch size changes per level
            runner = TransformersRunner(model, args.dtype, batch_size=c)
        runner.batch_size = c
        runner.warm_up(Workload(wl.prompts[:1], [2]))
        r = runner.run(wl, progress=True)
        out[c] = {"output_throughput": r["output_tok_s"], "duration": r["elapsed_s"]}
        print(f"transformers @ {c}: {r['output_tok_s']:.1f} out tok/s", flush=True)
    return out


def run_shared_prefix(model: str, vocab: int, args, log_dir: Path) -> dict:
    """Median (and mean) TTFT on the shared-prefix dataset, one request at a time after a first
    one that fills the cache, with prefix caching on and off (16 output tokens: TTFT is the
    point)."""
    from tokenmill.bench.serve import client_args, run_benchmark

    out = {}
    reqs = _dataset(args, vocab, args.shared_prefix_prompts, _seed(args, "shared-prefix"),
                    shared_prefix=True,
                    output_len=16)
    for name, extra in (("on", ()), ("off", ("--no-enable-prefix-caching",))):
        peer = peers.TokenmillPeer(log_dir, model, _tokenmill_flags(args) + extra,
                                   name=f"tokenmill-prefix-caching-{name}")
        with peer as url:
            one_at_a_time = client_args(url, model, seed=args.seed, max_concurrency=1,
                                        timeout=CLIENT_TIMEOUT_S)
            asyncio.run(run_benchmark(one_at_a_time, reqs[:1]))
            result, _ = asyncio.run(run_benchmark(one_at_a_time, reqs[1:]))
        out[name] = _summary(result)
    # NOTE: medians: on this noisy machine one slow request moves a mean of 16 by 10-20%.
    out["ttft_off_over_on"] = out["off"]["median_ttft_ms"] / out["on"]["median_ttft_ms"]
    out["mean_ttft_off_over_on"] = out["off"]["mean_ttft_ms"] / out["on"]["mean_ttft_ms"]
    return out


def _tokenmill_flags(args) -> tuple[str, ...]:
    return ("--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs))


def variants(specs: list[str] | None) -> list[tuple[str, tuple[str, ...]]]:
    """``--tokenmill-variant NAME=FLAGS``: more tokenmill servers, the same checkpoint with
    extra ``tokenmill serve`` flags, taking their turns beside the others (an A/B of a server
    setting on this drifting host has to run in one run)."""
    out, seen = [], set()
    for spec in specs or ():
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in seen:
            raise ValueError(f"--tokenmill-variant {spec!r}: expected NAME=FLAGS with a new "
                             "NAME of letters, digits, '.', '_' or '-'")
        seen.add(name)
        out.append((name, tuple(shlex.split(flags))))
    return out


def _default_model(tmp: Path, dtype: str) -> str:
    from tokenmill.testing.checkpoints import make_checkpoint

    if (tmp / "qwen2.5-0.5b-shape" / "config.json").exists():   # a --work-dir made earlier
        return str(tmp / "qwen2.5-0.5b-shape")
    return str(make_checkpoint(tmp / "qwen2.5-0.5b-shape", "qwen2", size="qwen2.5-0.5b",
                               dtype=dtype))


def run(args, tokenmill_variants: list[tuple[str, tuple[str, ...]]] = ()) -> dict:
    """The whole comparison; ``tokenmill_variants`` as ``variants`` parses them."""
    from transformers import AutoConfig

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tokenmill-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or _default_model(work, args.dtype)
    cfg = AutoConfig.from_pretrained(model, local_files_only=True)
    machine = measure_machine(cfg.hidden_size, cfg.intermediate_size)
    cost = ModelCost.from_config(cfg)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model or
              "random weights, Qwen2.5-0.5B shape", "dtype": args.dtype,
              "input_len": args.input_len, "output_len": args.output_len,
              "concurrency": args.concurrency, "repeats": args.repeats,
              "cpu_count": os.cpu_count(),
              "machine": machine.to_dict(),
              "roofline": bounds(cost, machine, args.input_len, args.output_len),
              "results": {}, "skipped": {}}
    print(json.dumps({"machine": report["machine"], "roofline": report["roofline"]}), flush=True)

    vocab = cfg.vocab_size
    peer_list = [peers.TokenmillPeer(work, model, _tokenmill_flags(args))]
    for name, flags in tokenmill_variants:
        peer_list.append(peers.TokenmillPeer(work, model, _tokenmill_flags(args) + flags,
                                             name=f"tokenmill-{name}"))
    if "llama-server" not in args.skip:
        try:
            src = Path(args.llama_cpp_src) if args.llama_cpp_src else peers.llama_cpp_sources()
            binary = peers.build_llama_server(src)
            gguf = peers.convert_to_gguf(src, model, work / f"model-{args.dtype}.gguf",
                                         {"bfloat16": "bf16", "float32": "f32"}[args.dtype])
            ctx = args.input_len + args.output_len + args.shared_prefix_len
            peer_list.append(peers.LlamaServerPeer(work, binary, gguf, max(args.concurrency),
                                                   ctx, os.cpu_count() or 2))
        except peers.PeerUnavailable as e:
            report["skipped"]["llama-server"] = str(e)
            print(f"llama-server skipped: {e}", flush=True)
    # tokenmill serves the folder under its path; llama-server takes any name.
    results, skipped = run_server_levels(peer_list, model, vocab, args)
    report["results"].update(results)
    report["skipped"].update(skipped)
    if "transformers" not in args.skip:
        report["results"]["transformers"] = run_transformers_levels(model, vocab, args)
    if "shared-prefix" not in args.skip:
        report["shared_prefix"] = run_shared_prefix(model, vocab, args, work)
    # Measured again at the end: the bound takes the best of both (see Machine.best).
    samples = [machine, measure_machine(cfg.hidden_size, cfg.intermediate_size)]
    machine = Machine.best(*samples)
    report["machine_samples"] = [m.to_dict() for m in samples]
    report["machine"] = machine.to_dict()
    report["roofline"] = bounds(cost, machine, args.input_len, args.output_len)
    report["ratios"] = ratios(report)
    return report


def ratios(report: dict) -> dict:
    res, roof = report["results"], report["roofline"]
    out = {}
    tm = res.get("tokenmill", {})
    for c, r in tm.items():
        row = {"roofline_share": r["output_throughput"] / roof["large_batch_out_tok_s"]}
        for peer in res:
            if peer != "tokenmill" and c in res[peer]:
                row[f"over_{peer}"] = r["output_throughput"] / res[peer][c]["output_throughput"]
        out[c] = row
    return out


def markdown(report: dict) -> str:
    res, rat = report["results"], report["ratios"]
    lines = ["| clients | peer | output tok/s | mean TTFT ms | mean TPOT ms |", "|---|---|---|---|---|"]
    for c in report["concurrency"]:
        for peer, levels in res.items():
            r = levels.get(c)
            if r is None:
                continue
            ttft = f"{r['mean_ttft_ms']:.0f}" if "mean_ttft_ms" in r else "-"
            tpot = f"{r['mean_tpot_ms']:.1f}" if "mean_tpot_ms" in r else "-"
            lines.append(f"| {c} | {peer} | {r['output_throughput']:.1f} | {ttft} | {tpot} |")
    others = ["llama-server", "transformers"] + [
        p for p in res if p not in ("tokenmill", "llama-server", "transformers")]
    lines += ["", "| clients | " + " | ".join(f"tokenmill / {p}" for p in others)
              + " | share of the compute roofline |", "|---" * (len(others) + 2) + "|"]
    for c, r in rat.items():
        cells = [f"{r[f'over_{p}']:.2f}x" if f"over_{p}" in r else "-" for p in others]
        lines.append(f"| {c} | {' | '.join(cells)} | {r['roofline_share'] * 100:.0f}% |")
    roof, m = report["roofline"], report["machine"]
    amx = [round(x.get("amx_gemm_gflops", 0)) for x in report.get("machine_samples", [])]
    lines += ["", f"Machine (the best of {len(amx) or 1} measurements"
              + (f"; AMX {' and '.join(map(str, amx))} GFLOP/s" if any(amx) else "")
              + f"): GEMM {m['bf16_gemm_gflops']:.0f} GFLOP/s in bf16, "
              f"{m['fp32_gemm_gflops']:.0f} in float32"
              + (f", {m['amx_gemm_gflops']:.0f} on tokenmill's AMX kernel"
                 if m.get("amx_gemm_gflops") else "") + "; memory copy "
              f"{m['copy_gbps']:.1f} GB/s. Bounds for this workload: "
              f"{roof['large_batch_out_tok_s']:.0f} output tok/s at large batch (compute), "
              f"{roof['batch1_out_tok_s']:.0f} at batch 1 (weights read once per step)."]
    sp = report.get("shared_prefix")
    if sp:
        lines.append(f"Shared prefix ({report.get('shared_prefix_len', '')} tokens): median TTFT "
                     f"{sp['on']['median_ttft_ms']:.0f} ms with prefix caching, "
                     f"{sp['off']['median_ttft_ms']:.0f} ms without "
                     f"({sp['ttft_off_over_on']:.1f}x; means {sp['on']['mean_ttft_ms']:.0f} "
                     f"and {sp['off']['mean_ttft_ms']:.0f} ms).")
    for peer, why in report["skipped"].items():
        lines.append(f"Skipped {peer}: {why}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> bool:
    from tokenmill.bench.plot import _pyplot

    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for peer, levels in report["results"].items():
        cs = sorted(levels, key=int)    # int keys, or str once the report went through JSON
        ax.plot([int(c) for c in cs], [levels[c]["output_throughput"] for c in cs], "o-",
                label=peer)
    roof = report["roofline"]["large_batch_out_tok_s"]
    ax.axhline(roof, color="gray", ls="--", label=f"compute roofline ({roof:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{report['model']}, {report['dtype']}, "
                 f"{report['input_len']} in / {report['output_len']} out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Model folder (default: random weights with Qwen2.5-0.5B's shape).")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompts-per-client", type=int, default=2)
    p.add_argument("--min-prompts", type=int, default=8)   # batch 1: 4 requests were too noisy
    p.add_argument("--repeats", type=int, default=3,
                   help="Runs of each level per server, the servers taking turns; the median "
                        "run is reported.")
    p.add_argument("--shared-prefix-len", type=int, default=1024)
    p.add_argument("--shared-prefix-prompts", type=int, default=17)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--tokenmill-variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="Another tokenmill server with these extra serve flags, measured in "
                        "turns with the others as tokenmill-NAME (repeatable), e.g. "
                        "'chunk512=--max-num-batched-tokens 512'.")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["llama-server", "transformers", "shared-prefix"])
    p.add_argument("--llama-cpp-src", default=None,
                   help="llama.cpp source tree (default: fetched from llama-cpp-python's sdist).")
    p.add_argument("--work-dir", default=None, help="Checkpoint, GGUF and server logs go here.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None, help="Write the JSON report here.")
    p.add_argument("--markdown", default=None, help="Write the markdown table here.")
    p.add_argument("--plot", default=None, help="Write a PNG here.")


def run_from_args(args) -> int:
    try:
        tokenmill_variants = variants(args.tokenmill_variant)   # before minutes of measuring
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = run(args, tokenmill_variants)
    report["shared_prefix_len"] = args.shared_prefix_len
    table = markdown(report)
    print(table)
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(report, args.plot)
    return 0
