"""Clients of the engine core: in this process, or in a process of its own over ZMQ.

The busy process runs ``run_engine_core``: it drains its input socket (requests, aborts),
takes one ``EngineCore.step``, and pushes ``EngineCoreOutputs`` back, so the front end's event
loop never waits on a model step. Messages are ``(kind, msgpack payload)`` ZMQ multipart frames.

If the core process dies, its sentinel fd becomes readable; the async client sees that at once
and fails every waiting caller with ``EngineDeadError`` instead of letting them hang.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import time
import traceback
import uuid

import msgspec
import zmq
import zmq.asyncio

from tokenmill.config import EngineConfig
from tokenmill.engine.interfaces import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest

logger = logging.getLogger(__name__)

ADD, ABORT, SHUTDOWN, UTILITY = b"ADD", b"ABORT", b"SHUTDOWN", b"UTILITY"
READY, OUTPUTS, ERROR, UTILITY_RESULT = b"READY", b"OUTPUTS", b"ERROR", b"UTILITY_RESULT"
STARTUP_TIMEOUT_S = 600


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can finish."""


class ReadyInfo(msgspec.Struct):
    num_kv_blocks: int
    max_model_len: int


# --------------------------------------------------------------------------- core process
def run_engine_core(config: EngineConfig, in_addr: str, out_addr: str) -> None:
    """Entry point of the engine core process."""
    from tokenmill.engine.core import EngineCore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s core: %(message)s")
    _die_with_parent()
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.bind(in_addr)
    out = ctx.socket(zmq.PUSH)
    out.connect(out_addr)
    enc = msgspec.msgpack.Encoder()
    try:
        core = EngineCore(config, progress=False)
        out.send_multipart([READY, enc.encode(ReadyInfo(core.num_kv_blocks, core.max_model_len))])
        _core_loop(core, inp, out, enc)
    except Exception:
        out.send_multipart([ERROR, traceback.format_exc().encode()])
        raise
    finally:
        out.close(linger=2000)
        inp.close(linger=0)
        ctx.term()


def _add_or_refuse(core, dec, payload: bytes, out, enc) -> None:
    """The front end validates requests; if one still slips through, fail that request
    (finish_reason "abort") instead of the whole engine."""
    try:
        core.add_request(dec.decode(payload))
    except (msgspec.ValidationError, ValueError) as e:
        rid = msgspec.msgpack.decode(payload)[0]
        logging.getLogger(__name__).error("refused request %s: %s", rid, e)
        refused = EngineCoreOutput(request_id=rid, new_token_ids=[], finish_reason="abort")
        out.send_multipart([OUTPUTS, enc.encode(EngineCoreOutputs(outputs=[refused]))])


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the front end dies, however it dies."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the idle loop's parent check still ends us


def _core_loop(core, inp, out, enc) -> None:
    add_dec = msgspec.msgpack.Decoder(EngineCoreRequest)
    ids_dec = msgspec.msgpack.Decoder(list[str])
    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    parent = os.getppid()
    while True:
        # NOTE: block only when idle; with work in flight just drain what has arrived.
        # An idle core wakes every second to check that its front end is still there.
        timeout = 0 if core.has_unfinished_requests() else 1000
        changed = False
        if timeout and os.getppid() != parent:
            return
        while poller.poll(timeout):
            kind, payload = inp.recv_multipart()
            if kind == ADD:
                _add_or_refuse(core, add_dec, payload, out, enc)
            elif kind == ABORT:
                core.abort_requests(ids_dec.decode(payload))
            elif kind == UTILITY:
                name = payload.decode()
                result = core.reset_prefix_cache() if name == "reset_prefix_cache" else None
                out.send_multipart([UTILITY_RESULT, enc.encode(result)])
            elif kind == SHUTDOWN:
                return
            timeout, changed = 0, True
        if core.has_unfinished_requests() or changed:
            outputs = core.step()
            out.send_multipart([OUTPUTS, enc.encode(outputs)])


# --------------------------------------------------------------------------- front side
class InProcCoreClient:
    """The core in this process; ``step`` is driven by the caller (tests, simple embedding)."""

    def __init__(self, config: EngineConfig):
        from tokenmill.engine.core import EngineCore

        self.core = EngineCore(config, progress=False)
        self.num_kv_blocks = self.core.num_kv_blocks

    def add_requests(self, reqs: list[EngineCoreRequest]) -> None:
        for r in reqs:
            self.core.add_request(r)

    def abort(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    async def get_outputs(self) -> EngineCoreOutputs:
        while not self.core.has_unfinished_requests():
            await asyncio.sleep(0.005)
        return self.core.step()

    def is_alive(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass


class ProcessCoreClient:
    def __init__(self, config: EngineConfig):
        base = os.path.join(tempfile.gettempdir(), f"tokenmill-{uuid.uuid4().hex[:12]}")
        self._in_addr, self._out_addr = f"ipc://{base}-in", f"ipc://{base}-out"
        self._sync_ctx = zmq.Context()
        out = self._sync_ctx.socket(zmq.PULL)
        out.bind(self._out_addr)
        self._enc = msgspec.msgpack.Encoder()
        self._out_dec = msgspec.msgpack.Decoder(EngineCoreOutputs)
        mpctx = mp.get_context("spawn")
        self.proc = mpctx.Process(target=run_engine_core, name="tokenmill-engine-core",
                                  args=(config, self._in_addr, self._out_addr), daemon=True)
        self.proc.start()
        self._in = self._sync_ctx.socket(zmq.PUSH)
        self._in.connect(self._in_addr)
        self.dead = False
        try:
            self._wait_ready(out)
        except BaseException:
            out.close(linger=0)
            self.shutdown()
            raise
        # The handshake was synchronous; from here on the front end reads from its event loop.
        self._out = zmq.asyncio.Socket.from_socket(out)

    def _wait_ready(self, sock) -> None:
        """Block until the core has loaded the model (or failed / died trying)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not sock.poll(200):
            if not self.proc.is_alive():
                self.dead = True
                raise RuntimeError(f"the engine core process exited during start-up "
                                   f"(code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError("the engine core did not start in time")
        kind, payload = sock.recv_multipart()
        if kind == ERROR:
            raise RuntimeError(f"the engine core failed to start:\n{payload.decode()}")
        info = msgspec.msgpack.decode(payload, type=ReadyInfo)
        self.num_kv_blocks = info.num_kv_blocks

    async def _recv(self, timeout: float | None = None):
        """Next message, or EngineDeadError as soon as the core process exits."""
        loop = asyncio.get_running_loop()
        died = loop.create_future()
        fd = self.proc.sentinel
        loop.add_reader(fd, lambda: died.done() or died.set_result(None))
        recv = asyncio.ensure_future(self._out.recv_multipart())
        try:
            done, _ = await asyncio.wait({recv, died}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(fd)
        if recv in done:
            return recv.result()
        recv.cancel()
        self.dead = True
        if not done:
            raise EngineDeadError("the engine core did not answer in time")
        raise EngineDeadError(f"the engine core process exited (code {self.proc.exitcode})")

    def add_requests(self, reqs: list[EngineCoreRequest]) -> None:
        for r in reqs:
            self._send(ADD, self._enc.encode(r))

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(ABORT, self._enc.encode(request_ids))

    def _send(self, kind: bytes, payload: bytes) -> None:
        if self.dead:
            raise EngineDeadError("the engine core process is not running")
        self._in.send_multipart([kind, payload])

    async def get_outputs(self) -> EngineCoreOutputs:
        while True:
            kind, payload = await self._recv()
            if kind == OUTPUTS:
                return self._out_dec.decode(payload)
            if kind == ERROR:
                self.dead = True
                raise EngineDeadError(f"the engine core failed:\n{payload.decode()}")

    def is_alive(self) -> bool:
        return not self.dead and self.proc.is_alive()

    def shutdown(self, timeout: float = 5.0) -> None:
        if self.proc.is_alive():
            try:
                self._in.send_multipart([SHUTDOWN, b""], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout)
        self._in.close(linger=0)
        if hasattr(self, "_out"):
            self._out.close(linger=0)
        for addr in (self._in_addr, self._out_addr):
            try:
                os.unlink(addr[len("ipc://"):])
            except FileNotFoundError:
                pass


def make_core_client(config: EngineConfig, in_process: bool) -> InProcCoreClient | ProcessCoreClient:
    return InProcCoreClient(config) if in_process else ProcessCoreClient(config)

