"""The `tokenmill` command."""

from __future__ import annotations

import argparse
import sys

from tokenmill import __version__


def _cmd_generate(args) -> int:
    from tokenmill import LLM, SamplingParams
    from tokenmill.cli_args import engine_config_from_args

    cfg = engine_config_from_args(args)
    llm = LLM(model=cfg.model.model, dtype=cfg.model.dtype, seed=cfg.model.seed,
              max_model_len=cfg.model.max_model_len, block_size=cfg.cache.block_size,
              kv_cache_memory=cfg.cache.kv_cache_memory, num_kv_blocks=cfg.cache.num_kv_blocks,
              enable_prefix_caching=cfg.cache.enable_prefix_caching,
              max_num_seqs=cfg.scheduler.max_num_seqs,
              max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
              enable_chunked_prefill=cfg.scheduler.enable_chunked_prefill)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    for out in llm.generate(args.prompt, params, use_tqdm=False):
        print(out.outputs[0].text)
    return 0


def _cmd_serve(args) -> int:
    print("tokenmill serve: the OpenAI-compatible server is not built yet (tracked in the "
          "server issue); use the offline API (`from tokenmill import LLM`) or "
          "`tokenmill generate MODEL PROMPT` meanwhile.", file=sys.stderr)
    return 2


def _cmd_bench_throughput(args) -> int:
    from tokenmill.bench.throughput import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    from tokenmill.bench.throughput import add_throughput_args
    from tokenmill.cli_args import add_engine_args

    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="Serve a model over an OpenAI-compatible HTTP API.")
    p.add_argument("model_tag", nargs="?", default=None, help="Local model folder.")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("generate", help="Generate from prompts offline (greedy by default).")
    p.add_argument("model", help="Local Hugging Face model folder.")
    p.add_argument("prompt", nargs="+", help="One or more prompts.")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=64)
    add_engine_args(p, skip=("model",))
    p.set_defaults(func=_cmd_generate)

    bench = sub.add_parser("bench", help="Benchmarks.").add_subparsers(dest="bench",
                                                                       required=True)
    p = bench.add_parser("throughput", help="Offline throughput: tokenmill vs transformers.")
    add_throughput_args(p)
    p.set_defaults(func=_cmd_bench_throughput)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
