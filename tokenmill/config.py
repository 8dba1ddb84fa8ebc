"""Engine configuration: one dataclass per concern.

Every field carries a ``help`` string in its metadata so command-line flags can be generated
from the dataclasses instead of being written twice. Each class validates itself once, in
``__post_init__``, and raises ``ValueError`` naming the offending numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

GiB = 1 << 30


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def parse_bytes(value: int | float | str) -> int:
    """Parse a memory size: an int of bytes, a float of GiB, or a string like '2GiB', '512MB'."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value * GiB)
    s = value.strip().lower().replace(" ", "")
    units = {"gib": GiB, "gb": 10**9, "g": GiB, "mib": 1 << 20, "mb": 10**6, "m": 1 << 20,
             "kib": 1 << 10, "kb": 10**3, "k": 1 << 10, "b": 1}
    for suffix, mult in units.items():
        if s.endswith(suffix):
            return int(float(s[: -len(suffix)]) * mult)
    number = float(s)
    # A bare small number is GiB (as in --kv-cache-memory 4); a large one is bytes.
    return int(number * GiB) if number < 4096 else int(number)


@dataclass
class ModelConfig:
    model: str = _f("", "Path to a local Hugging Face model folder.")
    tokenizer: str | None = _f(None, "Tokenizer folder (default: the model folder).")
    dtype: str = _f("auto", "Weight and activation dtype: auto (the checkpoint's), float32, "
                    "bfloat16 or float16.", choices=["auto", "float32", "bfloat16", "float16"])
    max_model_len: int | None = _f(None, "Longest sequence (prompt + output) served; "
                                   "default: the model's max_position_embeddings.")
    seed: int = _f(0, "Seed for random sampling of requests that set no seed of their own.")
    device: str = _f("auto", "Device: auto (cuda when available, else cpu), cpu or cuda.")
    enforce_eager: bool = _f(False, "On a GPU, run decode steps eagerly instead of replaying "
                             "CUDA graphs.")

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def resolved_device(self) -> str:
        """The one place that decides which device the engine runs on."""
        if self.device != "auto":
            return self.device
        import torch  # local: config stays importable without torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class CacheConfig:
    block_size: int = _f(16, "Tokens per KV cache block.")
    kv_cache_memory: int | float | str | None = _f(
        None, "Memory for the KV cache (bytes, or e.g. '2GiB'); default: 2 GiB on CPU, "
        "90% of free GPU memory after weights on CUDA.")
    num_kv_blocks: int | None = _f(None, "Exact number of KV blocks (overrides kv_cache_memory).")
    enable_prefix_caching: bool = _f(True, "Reuse KV blocks of shared prompt prefixes.")

    def __post_init__(self):
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
            if self.kv_cache_memory <= 0:
                raise ValueError(f"kv_cache_memory must be > 0, got {self.kv_cache_memory}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = _f(128, "Most sequences in one batch.")
    max_num_batched_tokens: int | None = _f(
        None, "Most tokens (prefill + decode) in one step; default 2048, or max_model_len "
        "when chunked prefill is off.")
    enable_chunked_prefill: bool = _f(True, "Split long prompts across steps, mixed with decodes.")

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class EngineConfig:
    """Everything the engine core needs, resolved once (max_model_len filled in by the loader)."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    check_invariants: bool = field(
        default_factory=lambda: os.environ.get("TOKENMILL_CHECK_INVARIANTS", "0") == "1",
        metadata={"help": "Check the KV allocator's invariants after every step (debug)."})

    def __post_init__(self):
        sch, mlen = self.scheduler, self.model.max_model_len
        if mlen is None or sch.max_num_batched_tokens is None:
            return
        if not sch.enable_chunked_prefill and sch.max_num_batched_tokens < mlen:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({sch.max_num_batched_tokens}) "
                f"must be >= max_model_len ({mlen}) so that every prompt fits in one step")


def config_fields(cls) -> list:
    """The dataclass fields of a config class that carry help text (used to build CLI flags)."""
    return [f for f in fields(cls) if "help" in f.metadata]


@dataclass
class ServerConfig:
    host: str = _f("127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
    port: int = _f(8000, "Port to listen on.")
    api_key: str | None = _f(None, "Require 'Authorization: Bearer KEY' on /v1 routes "
                             "(also read from TOKENMILL_API_KEY).")
    served_model_name: list[str] | None = _f(
        None, "Model name(s) clients use; the first is reported (default: the model path; "
        "tokenmill-demo for the embedded demo model).",
        nargs="+")
    chat_template: str | None = _f(None, "Chat template (a file or the template itself), "
                                   "replacing the tokenizer's.")
    allowed_origins: list[str] | None = _f(None, "CORS: allowed origins (off by default); "
                                           "'*' allows any.", nargs="+")
    ssl_keyfile: str | None = _f(None, "TLS key file.")
    ssl_certfile: str | None = _f(None, "TLS certificate file.")
    root_path: str | None = _f(None, "ASGI root_path, when behind a path-based proxy.")
    disable_log_requests: bool = _f(False, "Do not log one line per request.")
    max_queued_requests: int | None = _f(
        None, "Reject new requests with 429 when this many are already waiting.")
    shutdown_grace_period: float = _f(30.0, "Seconds in-flight requests may take to finish "
                                      "after SIGTERM.")

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get("TOKENMILL_API_KEY") or None
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("--ssl-keyfile and --ssl-certfile go together")
