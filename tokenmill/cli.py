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


DEMO_MODEL_NAME = "tokenmill-demo"


def default_model_path() -> str | None:
    """The embedded demo model that ships inside the package, if this build has one."""
    from pathlib import Path

    path = Path(__file__).parent / "assets" / "demo-model"
    return str(path) if (path / "config.json").is_file() else None


def _cmd_serve(args) -> int:
    from tokenmill.cli_args import config_from_args, engine_config_from_args
    from tokenmill.config import ServerConfig
    from tokenmill.server.app import run_server

    model = args.model_tag or default_model_path()
    if model is None:
        print("tokenmill serve: no MODEL given, and this build has no embedded default model "
              "yet; pass a local Hugging Face folder: tokenmill serve PATH", file=sys.stderr)
        return 2
    try:
        engine_config = engine_config_from_args(args, model=model)
        server_config = config_from_args(ServerConfig, args)
        if args.model_tag is None and not server_config.served_model_name:
            server_config.served_model_name = [DEMO_MODEL_NAME]
        return run_server(engine_config, server_config)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tokenmill serve: {e}", file=sys.stderr)
        return 1


def _cmd_chat(args) -> int:
    from tokenmill.client_cli import run_chat

    return run_chat(args)


def _cmd_complete(args) -> int:
    from tokenmill.client_cli import run_complete

    return run_complete(args)


def _cmd_bench_throughput(args) -> int:
    from tokenmill.bench.throughput import run_from_args

    return run_from_args(args)


def _cmd_bench_serve(args) -> int:
    from tokenmill.bench.serve import run_from_args

    return run_from_args(args)


def _cmd_bench_svo(args) -> int:
    from tokenmill.bench.server_vs_offline import run_from_args

    return run_from_args(args)


def _cmd_bench_compare(args) -> int:
    from tokenmill.bench.compare import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    from tokenmill.bench.compare import add_args as add_compare_args
    from tokenmill.bench.serve import add_serve_args
    from tokenmill.bench.server_vs_offline import add_args as add_svo_args
    from tokenmill.bench.throughput import add_throughput_args
    from tokenmill.cli_args import add_config_args, add_engine_args
    from tokenmill.client_cli import add_client_args
    from tokenmill.config import ServerConfig

    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="Serve a model over an OpenAI-compatible HTTP API.")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="Local Hugging Face model folder (default: the embedded demo model).")
    add_config_args(p, ServerConfig)
    add_engine_args(p, skip=("model",))
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("chat", help="Chat with a running server in the terminal (streaming).")
    add_client_args(p)
    p.add_argument("--system", default=None, help="A system prompt.")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("complete", help="Complete one prompt on a running server (streaming).")
    p.add_argument("prompt")
    add_client_args(p)
    p.set_defaults(func=_cmd_complete)

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
    p = bench.add_parser("serve", help="Load an OpenAI-compatible server and measure it.")
    add_serve_args(p)
    p.set_defaults(func=_cmd_bench_serve)
    p = bench.add_parser("server-vs-offline",
                         help="The same workload through tokenmill serve and LLM.generate.")
    add_svo_args(p)
    p.set_defaults(func=_cmd_bench_svo)
    p = bench.add_parser("compare", help="tokenmill's server vs llama.cpp's llama-server vs "
                         "transformers, same checkpoint and requests, with the roofline.")
    add_compare_args(p)
    p.set_defaults(func=_cmd_bench_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
