"""Offline throughput: tokenmill's ``LLM.generate`` vs transformers' batched ``generate``.

Both run the same seeded workload (random prompt token ids, per-request output lengths,
``ignore_eos``) on the same checkpoint, in one run, and the report gives both rates and the
ratio. transformers gets the usual static-batching treatment: requests sorted by prompt length,
left-padded batches, each batch generating as many tokens as its longest request; only the
requested tokens count as its output.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
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


def run_tokenmill(model: str, wl: Workload, dtype: str, max_num_seqs: int,
                  profile: bool) -> dict:
    from tokenmill import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_num_seqs=max_num_seqs, show_progress=False)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in wl.output_lens]
    prompts = [{"prompt_token_ids": p} for p in wl.prompts]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    got = sum(len(o.outputs[0].token_ids) for o in outs)
    assert got == wl.num_output_tokens, (got, wl.num_output_tokens)
    result = {"elapsed_s": elapsed, "output_tok_s": got / elapsed,
              "total_tok_s": (got + wl.num_prompt_tokens) / elapsed}
    if profile:
        result["decode_profile"] = profile_decode(llm, wl)
    return result


def profile_decode(llm, wl: Workload, batch: int = 32, steps: int = 20) -> dict:
    """Time pure-decode steps at a given batch and split them: model forward vs the rest."""
    from tokenmill import SamplingParams
    from tokenmill.sampling_params import RequestOutputKind

    eng = llm.engine
    runner = eng.core.runner
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for i in range(batch):
        eng.add_request(f"prof-{i}", {"prompt_token_ids": wl.prompts[i % len(wl.prompts)][:128]},
                        params)
    while any(r.num_computed_tokens < r.num_prompt_tokens
              for r in eng.core.scheduler.running + list(eng.core.scheduler.waiting)):
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


def run_transformers(model: str, wl: Workload, dtype: str, batch_size: int) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32,
                   "auto": "auto"}[dtype]
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, local_files_only=True)
    hf.eval()
    order = sorted(range(len(wl.prompts)), key=lambda i: len(wl.prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    pad = 0
    t0 = time.perf_counter()
    generated = 0
    with torch.inference_mode():
        for b in tqdm(batches, desc="transformers", unit="batch"):
            width = max(len(wl.prompts[i]) for i in b)
            ids = torch.tensor([[pad] * (width - len(wl.prompts[i])) + wl.prompts[i] for i in b])
            mask = torch.tensor([[0] * (width - len(wl.prompts[i])) + [1] * len(wl.prompts[i])
                                 for i in b])
            new = max(wl.output_lens[i] for i in b)
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=pad)
            generated += (out.shape[1] - width) * len(b)
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "output_tok_s": wl.num_output_tokens / elapsed,
            "total_tok_s": (wl.num_output_tokens + wl.num_prompt_tokens) / elapsed,
            "generated_incl_padding": generated}


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Model folder; default: a random 'mid' Llama checkpoint made on the fly.")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "auto"])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, nargs=2, default=[16, 384], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=32,
                   help="transformers' static batch size (default: all 32 at once)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="Also time pure-decode steps at batch 32 (forward vs overhead).")
    p.add_argument("--result-file", default=None, help="Write the results as JSON here.")


def run_from_args(args) -> int:
    import torch

    model = args.model
    tmp = None
    if model is None:
        from tokenmill.testing.checkpoints import make_checkpoint

        tmp = tempfile.TemporaryDirectory()
        model = str(make_checkpoint(Path(tmp.name) / "mid", "llama", size="mid",
                                    dtype=args.dtype if args.dtype != "auto" else "bfloat16"))
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model, local_files_only=True).vocab_size
    wl = make_workload(args.num_prompts, vocab, tuple(args.input_len), tuple(args.output_len),
                       args.seed)
    report = {"model": args.model or "random mid llama", "dtype": args.dtype,
              "num_prompts": args.num_prompts, "prompt_tokens": wl.num_prompt_tokens,
              "output_tokens": wl.num_output_tokens, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d")}
    report["tokenmill"] = run_tokenmill(model, wl, args.dtype, args.max_num_seqs, args.profile)
    if not args.skip_transformers:
        report["transformers"] = run_transformers(model, wl, args.dtype, args.hf_batch_size)
        report["ratio_output_tok_s"] = (report["tokenmill"]["output_tok_s"]
                                        / report["transformers"]["output_tok_s"])
    print(json.dumps(report, indent=2))
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


__all__ = ["Workload", "make_workload", "run_tokenmill", "run_transformers", "asdict"]
