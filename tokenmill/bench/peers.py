"""The servers `tokenmill bench compare` puts side by side: tokenmill's own and llama.cpp's
``llama-server``, each a subprocess on a free loopback port, measured with `bench serve`'s
client.

llama.cpp is built from the sources that ship inside llama-cpp-python's source package
(fetched once with pip into a cache folder), and the checkpoint is converted to GGUF with the
converter in those sources. A peer that cannot be set up raises ``PeerUnavailable``: the report
says it was skipped and why; nothing is faked.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

LLAMA_CPP_PYTHON = ("llama-cpp-python", "0.3.36")
CACHE = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))


class PeerUnavailable(Exception):
    """The peer could not be set up here (the message says why)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerPeer:
    """A server subprocess; ``with peer as base_url:`` starts it and stops it after."""

    name = "server"

    def __init__(self, log_dir: Path):
        self.log_path = Path(log_dir) / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return dict(os.environ)

    def __enter__(self) -> str:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(self.command(port), stdout=self.log_path.open("w"),
                                     stderr=subprocess.STDOUT, env=self.env())
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"{self.name} exited at start-up (code "
                                      f"{self.proc.returncode}); log: {self.log_path}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise PeerUnavailable(f"{self.name} did not become healthy in 600 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class TokenmillPeer(ServerPeer):
    """``tokenmill serve MODEL FLAGS...`` (no MODEL: the embedded demo model)."""

    name = "tokenmill"

    def __init__(self, log_dir: Path, model: str | None, flags: tuple[str, ...] = (),
                 name: str | None = None):
        self.name = name or self.name
        super().__init__(log_dir)
        self.model, self.flags = model, flags

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "tokenmill.cli", "serve",
                *([self.model] if self.model else []), "--host", "127.0.0.1", "--port",
                str(port), "--disable-log-requests", *self.flags]

    def env(self) -> dict:
        return {**os.environ, "TOKENMILL_CHECK_INVARIANTS": "0", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"}


class LlamaServerPeer(ServerPeer):
    """llama.cpp's server: ``slots`` parallel sequences, continuous batching, all cores."""

    name = "llama-server"

    def __init__(self, log_dir: Path, binary: Path, gguf: Path, slots: int, ctx_per_slot: int,
                 threads: int):
        super().__init__(log_dir)
        self.binary, self.gguf = binary, gguf
        self.slots, self.ctx_per_slot, self.threads = slots, ctx_per_slot, threads

    def command(self, port: int) -> list[str]:
        return [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port",
                str(port), "-np", str(self.slots), "-c", str(self.slots * self.ctx_per_slot),
                "-t", str(self.threads), "-tb", str(self.threads), "--cont-batching",
                "--no-webui"]


# --------------------------------------------------------------------------- llama.cpp set-up
def llama_cpp_sources(cache: Path = CACHE) -> Path:
    """llama.cpp's source tree from llama-cpp-python's sdist (pip-downloaded once)."""
    name, version = LLAMA_CPP_PYTHON
    root = cache / f"{name.replace('-', '_')}-{version}"
    src = root / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"{name}=={version}", "-d", str(cache)],
                       capture_output=True, text=True)
    archives = sorted(cache.glob(f"{name.replace('-', '_')}-{version}.tar.gz"))
    if r.returncode != 0 or not archives:
        raise PeerUnavailable(f"could not fetch {name}=={version}'s sources with pip: "
                              f"{(r.stderr or r.stdout).strip()[-300:]}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(cache, filter="data")
    if not (src / "CMakeLists.txt").exists():
        raise PeerUnavailable(f"{archives[0].name} has no vendor/llama.cpp")
    return src


def build_llama_server(src: Path, build_dir: Path | None = None) -> Path:
    """cmake-build ``llama-server`` (CPU only, this machine's ISA; a few minutes on 2 cores)."""
    build_dir = build_dir or src.parent.parent / "build"
    binary = build_dir / "bin" / "llama-server"
    if binary.exists():
        return binary
    if shutil.which("cmake") is None:
        raise PeerUnavailable("cmake is not installed")
    configure = ["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF"]
    build = ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j",
             str(os.cpu_count() or 2)]
    for cmd in (configure, build):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise PeerUnavailable(f"building llama-server failed ({' '.join(cmd[:3])}): "
                                  f"{(r.stderr or r.stdout).strip()[-500:]}")
    return binary


# NOTE: the converter only accepts BPE tokenizers whose pre-tokenizer it knows by a hash of
# their output; ours are unknown to it, and they split like Qwen2's, so we name that one. It
# also tries a SentencePiece vocabulary first and only falls back to BPE on FileNotFoundError,
# which an uninstalled sentencepiece does not raise.
_CONVERT = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
def no_sentencepiece(self, *args, **kwargs):
    raise FileNotFoundError("no SentencePiece model: a byte-level BPE tokenizer")
TextModel._set_vocab_sentencepiece = no_sentencepiece
TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_to_gguf(src: Path, model: str, out: Path, outtype: str = "bf16") -> Path:
    """The checkpoint as one GGUF file, at ``outtype`` precision (converted once)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", _CONVERT, str(src), model, "--outtype", outtype,
                        "--outfile", str(out)], capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        raise PeerUnavailable(f"GGUF conversion failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return out
