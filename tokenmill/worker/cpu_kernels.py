"""Native CPU kernels, compiled from ``csrc/`` at first use and called through ctypes:
decode attention over the paged cache, a linear layer for decode-sized batches (AVX-512 bf16),
and a linear layer on AMX tiles for everything larger where the CPU has AMX.

Plain C files build in about a second with the system C compiler, where a torch C++ extension
would take a minute; the built library is cached per source, flags and machine
(``-march=native``) under ``$TOKENMILL_CACHE_DIR`` (default ``~/.cache/tokenmill``). Without a
compiler, or if the build fails, ``supports`` and ``linear_supported`` say no and the callers
keep to their PyTorch paths; ``TOKENMILL_NATIVE_KERNELS=0`` forces those paths and
``TOKENMILL_AMX=0`` leaves out only the AMX one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).resolve().parent / "csrc").glob("*.c"))
HEADERS = sorted((Path(__file__).resolve().parent / "csrc").glob("*.h"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.append("-mprefer-vector-width=512")   # gcc would otherwise auto-vectorize at 256
LANES = 16   # csrc's vector width: head_dim must be a multiple
MAX_GROUP, MAX_DIM = 64, 256

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("TOKENMILL_CACHE_DIR") or Path.home() / ".cache" / "tokenmill"
    return Path(root) / "kernels"


def enabled() -> bool:
    return os.environ.get("TOKENMILL_NATIVE_KERNELS", "1") not in ("0", "false", "no")


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str) -> Path:
    src = b"".join(f.read_bytes() for f in SOURCES + HEADERS)
    cpu = platform.machine() + (Path("/proc/cpuinfo").read_text(errors="ignore")
                                if Path("/proc/cpuinfo").exists() else "")
    flags = [f for f in cpu.splitlines() if f.startswith("flags")][:1]
    key = hashlib.sha256(src + " ".join([cc] + FLAGS + flags).encode()).hexdigest()[:16]
    out = cache_dir() / f"tokenmill-kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: build into a temporary name and rename: processes starting together (a test
    # session, a server and its benchmark) may build at the same time.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(tmp_out), "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp_out, out)
    return out


def _load():
    if "lib" in _loaded:
        return _loaded["lib"]
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        lib = None
        cc = _compiler()
        if cc is None:
            logger.warning("no C compiler found: the CPU kernels' PyTorch paths run instead")
        else:
            try:
                lib = ctypes.CDLL(str(_build(cc)))
                names = ["paged_decode_attention_f32", "paged_decode_attention_bf16"]
                if lib.has_avx512_bf16():
                    names.append("paged_decode_attention_bf16_avx512")
                for name in names:
                    fn = getattr(lib, name)
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int,
                                   ctypes.c_void_p, ctypes.c_int64]
                for fn in (lib.linear_bf16_vnni, lib.linear_bf16_amx):
                    fn.restype = ctypes.c_int
                    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                   ctypes.c_int64, ctypes.c_int64]
                lib.add_rmsnorm_bf16.restype = lib.silu_mul_bf16.restype = ctypes.c_int
                i64, ptr = ctypes.c_int64, ctypes.c_void_p
                lib.add_rmsnorm_bf16.argtypes = [ptr, i64, ptr, i64, ptr, ctypes.c_float, ptr,
                                                 i64, ptr, i64, i64, i64]
                lib.silu_mul_bf16.argtypes = [ptr, i64, ptr, i64, i64, i64]
                lib.rope_bf16.restype = ctypes.c_int
                lib.rope_bf16.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64]
                lib.argmax_bf16.restype = ctypes.c_int
                lib.argmax_bf16.argtypes = [ptr, i64, i64, i64, ptr]
                lib.decode_layers_bf16.restype = ctypes.c_int
                lib.decode_layers_bf16.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                                   ctypes.c_int, ptr, ctypes.c_int, ptr]
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", b"") or b""
                logger.warning("building the CPU kernels failed (%s %s): their PyTorch paths "
                               "run instead", e, detail.decode(errors="replace")[-500:])
                lib = None
        _loaded["lib"] = lib
        return lib


def _amx_works(lib) -> bool:
    """AMX tiles usable in this process: the OS grants them, and a tile product run in a child
    process (an illegal instruction there cannot take this one down) gives the right answer."""
    if not lib.has_linear_bf16_amx():
        return False
    probe = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
             "lib.amx_selftest.restype = ctypes.c_float; sys.exit(lib.amx_selftest() != 32.0)")
    try:
        child = subprocess.run([sys.executable, "-c", probe, lib._name], capture_output=True,
                               timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return child.returncode == 0 and bool(lib.amx_enable())


def supports(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
             head_dim: int) -> bool:
    """Whether ``decode_attention`` can serve a model of this geometry here."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and enabled()
            and head_dim % LANES == 0 and head_dim <= MAX_DIM
            and num_heads // num_kv_heads <= MAX_GROUP and _load() is not None)


def prefill_supported(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether prefill chunks also go through ``decode_attention``, one query row per token
    (after ``supports``): where the AVX-512 bf16 kernel runs, which beat SDPA's causal
    attention here 2.6x on 16 prompts of 128 tokens and 1.6x on one of 2048 (BENCHMARKS.md);
    the portable kernels are slower than SDPA there."""
    lib = _load()
    return dtype == torch.bfloat16 and lib is not None and _bf16_avx512(lib, head_dim)


def _bf16_avx512(lib, head_dim: int) -> bool:
    """Whether bf16 attention runs the AVX-512 kernel (else the portable one)."""
    return head_dim % 32 == 0 and bool(lib.has_avx512_bf16())


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, window: int | None,
                     out: torch.Tensor) -> None:
    """out[b] = attention of q[b] ([B, H, D], rows may be strided) over its ``seq_lens[b]``
    cached tokens, read in place from ``kv_cache`` ([2*Hkv, N, bs, D]) through
    ``block_table`` ([B, max_blocks] int32). Call ``supports`` first."""
    lib = _load()
    B, H, D = q.shape
    two_hkv, num_blocks, block_size, _ = kv_cache.shape
    assert q.dtype == kv_cache.dtype == out.dtype and q.stride(2) == 1 and q.stride(1) == D
    assert out.stride(2) == 1 and out.stride(1) == D and kv_cache.is_contiguous()
    assert block_table.dtype == seq_lens.dtype == torch.int32 and block_table.is_contiguous()
    if q.dtype == torch.float32:
        fn = lib.paged_decode_attention_f32
    elif _bf16_avx512(lib, D):
        fn = lib.paged_decode_attention_bf16_avx512
    else:
        fn = lib.paged_decode_attention_bf16
    rc = fn(q.data_ptr(), q.stride(0), kv_cache.data_ptr(), num_blocks, block_size,
            two_hkv // 2, H, D, block_table.data_ptr(), block_table.shape[1],
            seq_lens.data_ptr(), B, scale, window or 0, out.data_ptr(), out.stride(0))
    if rc != 0:
        raise RuntimeError(f"paged_decode_attention failed ({rc})")


# ---------------------------------------------------------------------------------------------
# Linear layers for few rows (decode)


def linear_supported(weight: torch.Tensor) -> bool:
    """Whether ``pack_linear`` / ``linear`` serve this weight here (bf16 on a CPU with
    AVX-512 bf16, an even number of input features)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.shape[1] % 2:
        return False
    lib = _load() if enabled() else None
    return lib is not None and bool(lib.has_linear_bf16_vnni())


def amx_supported(weight: torch.Tensor) -> bool:
    """Whether ``linear_amx`` serves this weight here (``linear_supported``, AMX usable, the
    number of input features a multiple of 32; ``TOKENMILL_AMX=0`` says no)."""
    if (not linear_supported(weight) or weight.shape[1] % 32
            or os.environ.get("TOKENMILL_AMX", "1") in ("0", "false", "no")):
        return False
    if "amx" not in _loaded:   # once, on first need: the probe starts a child process
        with _lock:
            if "amx" not in _loaded:
                _loaded["amx"] = _amx_works(_loaded["lib"])
    return _loaded["amx"]


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/16, K/2, 16, 2] (N padded with zero rows to a multiple of 32): each 64-byte
    row holds two consecutive inputs of 16 consecutive outputs, vdpbf16ps's operand order, and
    16 such rows are one AMX tile of the weight."""
    n, k = weight.shape
    padded = -(-n // 32) * 32
    w = torch.zeros(padded, k, dtype=weight.dtype)
    w[:n] = weight
    return w.view(padded // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
           out_features: int, amx: bool = False) -> torch.Tensor:
    """x [M, K] bf16 @ W^T (+ bias, float32) -> [M, N] bf16, from ``pack_linear(W)``; on AMX
    tiles when ``amx`` (check ``amx_supported`` first)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, out_features, dtype=x.dtype)
    fn = _loaded["lib"].linear_bf16_amx if amx else _loaded["lib"].linear_bf16_vnni
    rc = fn(x.data_ptr(), x.stride(0), packed.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), out_features, m,
            out_features, k)
    if rc != 0:
        raise RuntimeError(f"{'linear_bf16_amx' if amx else 'linear_bf16_vnni'} failed ({rc})")
    return y


# ---------------------------------------------------------------------------------------------
# Elementwise steps of a decoder block (bf16)


def elementwise_supported(x: torch.Tensor) -> bool:
    """Whether ``add_rmsnorm`` / ``silu_mul`` serve this activation here (bf16 on a CPU with
    AVX-512 bf16)."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or not enabled():
        return False
    lib = _load()
    return lib is not None and bool(lib.has_elementwise_bf16())


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(r), r) with r = x + delta (or x when delta is None); x, delta [T, D] bf16,
    weight [D] bf16. Rounds as transformers' bf16 RMSNorm and residual add do."""
    x = _rows(x)
    T, D = x.shape
    y = torch.empty(T, D, dtype=x.dtype)
    res = x if delta is None else torch.empty(T, D, dtype=x.dtype)
    delta = None if delta is None else _rows(delta)
    rc = _loaded["lib"].add_rmsnorm_bf16(
        x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
        0 if delta is None else delta.stride(0), weight.data_ptr(), eps, res.data_ptr(),
        res.stride(0), y.data_ptr(), y.stride(0), T, D)
    if rc != 0:
        raise RuntimeError(f"add_rmsnorm_bf16 failed ({rc})")
    return y, res


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] ([T, 2I] bf16) -> [T, I]."""
    gate_up = _rows(gate_up)
    T, I2 = gate_up.shape
    y = torch.empty(T, I2 // 2, dtype=gate_up.dtype)
    rc = _loaded["lib"].silu_mul_bf16(gate_up.data_ptr(), gate_up.stride(0), y.data_ptr(),
                                      y.stride(0), T, I2 // 2)
    if rc != 0:
        raise RuntimeError(f"silu_mul_bf16 failed ({rc})")
    return y


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x [T, NH, D] bf16 (heads contiguous within a token),
    cos and sin [T, 1, D] (sin's first half negated) -> [T, NH, D]."""
    T, NH, D = x.shape
    if x.stride(2) != 1 or x.stride(1) != D:
        x = x.contiguous()
    cos, sin = cos.reshape(T, D).contiguous(), sin.reshape(T, D).contiguous()
    y = torch.empty(T, NH, D, dtype=x.dtype)
    rc = _loaded["lib"].rope_bf16(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(),
                                  y.data_ptr(), T, NH, D)
    if rc != 0:
        raise RuntimeError(f"rope_bf16 failed ({rc})")
    return y


# ---------------------------------------------------------------------------------------------
# Greedy sampling


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for [B, V] logits; bf16 CPU rows natively, without the float32
    copy torch's path would make (ties and NaN as torch: the first index of the maximum)."""
    if logits.device.type != "cpu" or logits.dtype != torch.bfloat16 or not enabled() \
            or logits.stride(-1) != 1 or _load() is None:
        return logits.argmax(dim=-1)
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long)
    rc = _loaded["lib"].argmax_bf16(logits.data_ptr(), logits.stride(0), B, V, out.data_ptr())
    if rc != 0:
        raise RuntimeError(f"argmax_bf16 failed ({rc})")
    return out


# ---------------------------------------------------------------------------------------------
# A decode-only step's decoder layers in one call (csrc/decode_layers.c)


class DecodeDims(ctypes.Structure):
    """A model's geometry as ``decode_layers_bf16`` reads it (``tm_dims``)."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "num_layers", "hidden", "inter", "num_heads", "num_kv_heads", "head_dim", "num_blocks",
        "block_size", "window", "amx_min_rows")] + [
        (name, ctypes.c_float) for name in ("eps", "qk_eps", "scale")]


class DecodeLayer(ctypes.Structure):
    """One layer's tensors (``tm_layer``): data pointers, 0 for an absent bias or q/k norm."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "ln1", "ln2", "wqkv", "wo", "wgu", "wd", "bqkv", "bo", "bgu", "bd", "q_norm", "k_norm",
        "cache")]


def decode_layers_supported() -> bool:
    lib = _load() if enabled() else None
    return lib is not None and bool(lib.has_decode_layers_bf16())


def decode_layers(dims: DecodeDims, layers: ctypes.Array, final_norm: torch.Tensor,
                  x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                  table: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """The final-normed hidden states [M, hidden] of M decode tokens whose embeddings are x
    ([M, hidden] bf16), through every layer of ``layers``; cos, sin [M, head_dim], slots [M]
    int64, table [M, max_blocks] and lens [M] int32 (all contiguous). Call
    ``decode_layers_supported`` first."""
    M = x.shape[0]
    out = torch.empty_like(x)
    rc = _loaded["lib"].decode_layers_bf16(
        ctypes.byref(dims), layers, final_norm.data_ptr(), x.data_ptr(), cos.data_ptr(),
        sin.data_ptr(), slots.data_ptr(), table.data_ptr(), table.shape[1], lens.data_ptr(), M,
        out.data_ptr())
    if rc != 0:
        raise RuntimeError(f"decode_layers_bf16 failed ({rc})")
    return out
