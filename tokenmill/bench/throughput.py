"""Offline throughput: tokenmill's ``LLM.generate`` vs transformers' batched ``generate``.

Both run the same seeded workload (random prompt token ids, per-request output lengths,
``ignore_eos``) on the same checkpoint, in one process, ``--runs`` times each, alternating, so
that machine noise hits both alike; the report gives each engine's median and the ratio of the
medians. transformers gets the usual static-batching treatment: requests sorted by prompt
length, left-padded batches (all 32 in one batch is its best case here), each batch generating as
many tokens as its longest request, sdpa attention; only the requested tokens count as its
output. ``--profile`` also times pure-decode steps at batch 32 and reports the share of a step
spent outside the model forward (scheduling, input preparation, sampling, output processing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(n: int, vocab_size: int, input_range: tuple[int, int],
                  output_range: tuple[int, int], seed: int) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab_size) for _ in range(rng.randint(*input_range))]
               for _ in range(n)]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(n)])


def fresh_workloads(n: int, vocab_size: int, input_range: tuple[int, int],
                    output_range: tuple[int, int], seed: int,
                    runs: int) -> tuple[Workload, list[Workload]]:
    """A small warm-up workload and one workload per timed run (seeds seed, seed+1, ...).

    NOTE: fresh prompts in every run (each run's the same for every engine): repeating a run's
    prompts would let tokenmill's prefix cache skip their prefill."""
    warm = make_workload(4, vocab_size, input_range, (4, 4), seed - 1)
    return warm, [make_workload(n, vocab_size, input_range, output_range, seed + i)
                  for i in range(runs)]


# ---------------------------------------------------------------------------------------------
# tokenmill


class TokenmillRunner:
    def __init__(self, model: str, dtype: str, **engine_kwargs):
        from tokenmill import LLM, SamplingParams

        self.llm = LLM(model=model, dtype=dtype, show_progress=False, **engine_kwargs)
        self._params = SamplingParams

    def run(self, wl: Workload, progress: bool = False) -> dict:
        params = [self._params(temperature=0, max_tokens=o, ignore_eos=True)
                  for o in wl.output_lens]
        prompts = [{"prompt_token_ids": p} for p in wl.prompts]
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params, use_tqdm=progress)
        elapsed = time.perf_counter() - t0
        got = sum(len(o.outputs[0].token_ids) for o in outs)
        assert got == wl.num_output_tokens, (got, wl.num_output_tokens)
        return _rates(wl, elapsed)

    def warm_up(self, wl: Workload) -> None:
        self.run(wl)

    def profile_decode(self, wl: Workload, batch: int = 32, steps: int = 20) -> dict:
        """Time pure-decode steps at ``batch`` and split them: model forward vs the rest."""
        from tokenmill.sampling_params import RequestOutputKind

        eng = self.llm.engine
        runner, scheduler = eng.core.runner, eng.core.scheduler
        params = self._params(temperature=0, max_tokens=10_000, ignore_eos=True,
                              output_kind=RequestOutputKind.FINAL_ONLY)
        for i in range(batch):
            eng.add_request(f"prof-{i}", {"prompt_token_ids": wl.prompts[i % len(wl.prompts)]},
                            params)
        while any(r.num_computed_tokens < r.num_prompt_tokens
                  for r in scheduler.running + list(scheduler.waiting)):
            eng.step()
        step_s, fwd_s = [], []
        for _ in range(steps):
            runner.forward_time = 0.0
            t0 = time.perf_counter()
            eng.step()
            step_s.append(time.perf_counter() - t0)
            fwd_s.append(runner.forward_time)
        for i in range(batch):
            eng.abort_request(f"prof-{i}")
        eng.step()
        step, fwd = statistics.median(step_s), statistics.median(fwd_s)
        return {"batch": batch, "median_step_ms": step * 1e3, "median_forward_ms": fwd * 1e3,
                "overhead_share": (step - fwd) / step}


# ---------------------------------------------------------------------------------------------
# transformers


class TransformersRunner:
    def __init__(self, model: str, dtype: str, batch_size: int, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32,
                       "auto": "auto"}[dtype]
        self.device = device
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype,
                                                       attn_implementation="sdpa",
                                                       local_files_only=True).to(device).eval()
        self.batch_size = batch_size

    def run(self, wl: Workload, progress: bool = False) -> dict:
        import torch
        from tqdm.auto import tqdm

        order = sorted(range(len(wl.prompts)), key=lambda i: len(wl.prompts[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        pad = 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in tqdm(batches, desc="transformers", unit="batch", disable=not progress):
                width = max(len(wl.prompts[i]) for i in b)
                ids = torch.tensor([[pad] * (width - len(wl.prompts[i])) + wl.prompts[i]
                                    for i in b], device=self.device)
                mask = torch.tensor([[0] * (width - len(wl.prompts[i]))
                                     + [1] * len(wl.prompts[i]) for i in b], device=self.device)
                new = max(wl.output_lens[i] for i in b)
                out = self.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                       min_new_tokens=new, do_sample=False, pad_token_id=pad)
                assert out.shape[1] - width == new
                out.tolist()  # the last step's tokens reached the host, as tokenmill's do
        return _rates(wl, time.perf_counter() - t0)

    def warm_up(self, wl: Workload) -> None:
        self.run(wl)


def _rates(wl: Workload, elapsed: float) -> dict:
    return {"elapsed_s": elapsed, "output_tok_s": wl.num_output_tokens / elapsed,
            "total_tok_s": (wl.num_output_tokens + wl.num_prompt_tokens) / elapsed}


# ---------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def summarize(runs: list[dict]) -> dict:
    rates = [r["output_tok_s"] for r in runs]
    return {"output_tok_s_median": statistics.median(rates), "output_tok_s_runs": rates,
            "elapsed_s_runs": [r["elapsed_s"] for r in runs]}


def plot_report(report: dict, path: str) -> bool:
    """Bars: median output tok/s per engine (dots: each run); and the decode step split."""
    from tokenmill.bench.plot import _pyplot

    plt = _pyplot()
    if plt is None:
        return False
    engines = [k for k in report["results"]]
    prof = report.get("decode_profile")
    fig, axes = plt.subplots(1, 2 if prof else 1, figsize=(11 if prof else 6, 4), squeeze=False)
    ax = axes[0][0]
    med = [report["results"][e]["output_tok_s_median"] for e in engines]
    ax.bar(range(len(engines)), med, color=["tab:blue"] + ["tab:gray"] * (len(engines) - 1))
    for i, e in enumerate(engines):
        runs = report["results"][e]["output_tok_s_runs"]
        ax.plot([i] * len(runs), runs, "k.", markersize=5)
        ax.annotate(f"{med[i]:.0f}", (i, med[i]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(engines)), engines, fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{report['model']}, {report['dtype']}, {report['num_prompts']} requests: "
                 f"{report['ratio']:.2f}x", fontsize=9)
    if prof:
        ax = axes[0][1]
        fwd, step = prof["median_forward_ms"], prof["median_step_ms"]
        ax.barh([0], [fwd], label="model forward")
        ax.barh([0], [step - fwd], left=[fwd], label="outside the forward")
        ax.set_yticks([])
        ax.set_xlabel("ms per decode step")
        ax.set_title(f"decode step at batch {prof['batch']}: "
                     f"{prof['overhead_share'] * 100:.1f}% outside the forward", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot written to {path}")
    return True


# ---------------------------------------------------------------------------------------------
# CLI


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Model folder; default: a random checkpoint of --size made on the fly.")
    p.add_argument("--size", default="mid", help="Size of the random checkpoint (see "
                   "tokenmill.testing.checkpoints.SIZES).")
    p.add_argument("--arch", default="llama", help="Architecture of the random checkpoint "
                   "(llama, qwen2, ...; --size qwen2.5-0.5b wants qwen2).")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "auto"])
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda; "
                   "both engines run there.")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, nargs=2, default=[16, 384], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=3, help="Timed runs per engine (median quoted).")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--hf-batch-size", type=int, nargs="+", default=[32],
                   help="transformers' static batch size(s); the ratio is against the fastest.")
    p.add_argument("--hf-dtype", default=None, help="transformers' dtype (default: --dtype).")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="Also time pure-decode steps at batch 32 (forward vs overhead).")
    p.add_argument("--result-file", default=None, help="Write the results as JSON here.")
    p.add_argument("--plot", default=None, help="Write a PNG plot here (needs matplotlib).")


def run_from_args(args) -> int:
    from transformers import AutoConfig

    from tokenmill.config import ModelConfig

    tmp = None
    model = args.model
    if model is None:
        from tokenmill.testing.checkpoints import make_checkpoint

        tmp = tempfile.TemporaryDirectory()
        dtype = args.dtype if args.dtype != "auto" else "bfloat16"
        model = str(make_checkpoint(Path(tmp.name) / args.size, args.arch, size=args.size,
                                    dtype=dtype))
    vocab = AutoConfig.from_pretrained(model, local_files_only=True).vocab_size
    device = ModelConfig(model=model, device=args.device).resolved_device()
    warm, wls = fresh_workloads(args.num_prompts, vocab, tuple(args.input_len),
                                tuple(args.output_len), args.seed, args.runs)
    wl = wls[0]
    report = {"command": "tokenmill bench throughput " + " ".join(sys.argv[3:]
                                                                  if sys.argv[1:2] == ["bench"]
                                                                  else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
              "model": args.model or f"random {args.size} {args.arch}", "dtype": args.dtype,
              "device": device,
              "num_prompts": args.num_prompts, "prompt_tokens": wl.num_prompt_tokens,
              "output_tokens": wl.num_output_tokens, "runs": args.runs}
    engine_kwargs = {"max_num_seqs": args.max_num_seqs, "device": device}
    if args.max_num_batched_tokens:
        engine_kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    runners = {"tokenmill": TokenmillRunner(model, args.dtype, **engine_kwargs)}
    if not args.skip_transformers:
        for bs in args.hf_batch_size:
            runners[f"transformers (batch {bs})"] = TransformersRunner(
                model, args.hf_dtype or args.dtype, bs, device)
    for r in runners.values():
        r.warm_up(warm)
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    for i in range(args.runs):   # alternate engines so that noise hits all alike
        for name, r in runners.items():
            runs[name].append(r.run(wls[i]))
            print(f"run {i + 1}/{args.runs} {name}: "
                  f"{runs[name][-1]['output_tok_s']:.1f} output tok/s", flush=True)
    report["results"] = {name: summarize(rs) for name, rs in runs.items()}
    med = {name: s["output_tok_s_median"] for name, s in report["results"].items()}
    baselines = [n for n in med if n != "tokenmill"]
    if baselines:
        best = max(baselines, key=med.get)
        report["baseline"] = best
        report["ratio"] = med["tokenmill"] / med[best]
    else:
        report["ratio"] = float("nan")
    if args.profile:
        report["decode_profile"] = runners["tokenmill"].profile_decode(wl)
    print(json.dumps(report, indent=2))
    for name, m in med.items():
        print(f"{name:>28}: {m:8.1f} output tok/s (median of {args.runs})")
    if baselines:
        print(f"{'ratio':>28}: {report['ratio']:8.2f}x vs {report['baseline']}")
    if args.profile:
        prof = report["decode_profile"]
        print(f"{'decode step, batch 32':>28}: {prof['median_step_ms']:.1f} ms, "
              f"{prof['overhead_share'] * 100:.1f}% outside the model forward")
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot_report(report, args.plot)
    if tmp is not None:
        tmp.cleanup()
    return 0
