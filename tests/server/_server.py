"""Run the real `tokenmill serve` in a subprocess on a loopback port, and read its /metrics.

    with start_server(model_path, "--served-model-name", "tiny") as srv:
        srv.url        http://127.0.0.1:PORT   (srv.v1 is the OpenAI base_url)
        srv.proc       the subprocess.Popen
        srv.metrics()  {sample name: {frozenset(labels): value}}

The server's stdout/stderr go to a log file (never a pipe, which could fill up and block it);
a failed start-up raises with the log's tail.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0
# Flags every test server gets: float32 (exact greedy parity between requests) and a small KV
# cache (a tiny model needs little; the CPU default of 2 GiB is wasted memory here).
BASE_FLAGS = ("--dtype", "float32", "--num-kv-blocks", "1024", "--host", "127.0.0.1")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    """The environment for a tokenmill subprocess: the repo importable, offline, quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.pop("TOKENMILL_API_KEY", None)
    env.update(extra)
    return env


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path
    children: list[tuple[int, str]] = field(default_factory=list)  # (pid, start time)

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, dict[frozenset, float]]:
        r = httpx.get(f"{self.url}/metrics", timeout=10)
        r.raise_for_status()
        return parse_metrics(r.text)


def _limit_memory(max_bytes: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    return apply


def wait_healthy(url: str, proc: subprocess.Popen, log_path: Path,
                 timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited during start-up (code {proc.returncode}):\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not become healthy in {timeout:.0f}s:\n"
                       f"{log_path.read_text(errors='replace')[-4000:]}")


def launch(model: str, *flags: str, env: dict | None = None,
           memory_limit: int | None = None) -> Server:
    """Start `tokenmill serve MODEL` and wait until GET /health answers 200."""
    port = free_port()
    fd, log_name = tempfile.mkstemp(prefix="tokenmill-server-", suffix=".log")
    os.close(fd)
    log_path = Path(log_name)
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", model, "--port", str(port),
           *BASE_FLAGS, *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or server_env(), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_limit_memory(memory_limit) if memory_limit else None)
    srv = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_healthy(srv.url, proc, log_path)
    except BaseException:
        stop(srv)
        raise
    srv.children = descendants(proc.pid)
    return srv


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every process below `pid`, as (pid, start time) so a reused pid is never mistaken."""
    out: list[tuple[int, str]] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            kids = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for kid in map(int, kids):
            start = _start_time(kid)
            if start is not None:
                out.append((kid, start))
                out.extend(descendants(kid))
    return out


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


def alive(proc: tuple[int, str]) -> bool:
    """True while the process exists (the same one: same start time) and is not a zombie."""
    fields = _stat(proc[0])
    return bool(fields) and fields[19] == proc[1] and fields[0] != "Z"


def reap(procs: list[tuple[int, str]], timeout: float = 10.0) -> list[int]:
    """SIGTERM (then SIGKILL) those of `procs` still alive; returns their pids (leftovers of
    a server that did not clean up after itself)."""
    left = [p for p in procs if alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if wait_for(lambda: not any(alive(p) for p in left), timeout):
            break
    return [pid for pid, _ in left]


def stop(srv: Server, timeout: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL if it will not go; returns the exit code. Processes the server
    started (the engine core) and left behind are ended too, so no test run leaks them."""
    proc = srv.proc
    kids = list(dict.fromkeys(srv.children + descendants(proc.pid)))
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    reap(kids)
    return proc.returncode


@contextlib.contextmanager
def start_server(model: str, *flags: str, env: dict | None = None,
                 memory_limit: int | None = None) -> Iterator[Server]:
    srv = launch(model, *flags, env=env, memory_limit=memory_limit)
    try:
        yield srv
    finally:
        stop(srv)
        srv.log_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reference
def chat_prompt_ids(tokenizer, messages, **kw) -> list[int]:
    """Token ids of a chat prompt as transformers renders it (tokenize=True)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


# --------------------------------------------------------------------------- errors
def assert_error_envelope(r: httpx.Response, status: int) -> dict:
    assert "Traceback" not in r.text
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    return err


# --------------------------------------------------------------------------- metrics
def parse_metrics(text: str) -> dict[str, dict[frozenset, float]]:
    """Prometheus text -> {sample name: {frozenset(label items): value}}.

    Sample names are the exposed ones: a counter `x` shows as `x_total`, a histogram `h` as
    `h_bucket`, `h_count`, `h_sum`.
    """
    out: dict[str, dict[frozenset, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def metric(metrics: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for lab, v in metrics.get(name, {}).items() if want <= lab)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_idle(srv: Server, timeout: float = 2.0) -> dict:
    """Poll /metrics until nothing runs and no KV block is held; returns the last metrics."""
    last: dict = {}

    def idle() -> bool:
        nonlocal last
        last = srv.metrics()
        return (metric(last, "tokenmill:num_requests_running") == 0
                and metric(last, "tokenmill:kv_cache_usage_perc") == 0)

    wait_for(idle, timeout)
    return last
