"""AsyncLLM: the engine as the server sees it.

    generate() --tokenize--> core client --ZMQ--> EngineCore process
    _output_loop <--EngineCoreOutputs-- ; OutputProcessor -> per-request asyncio.Queue -> generate()

Tokenization and detokenization stay in this (front) process. A caller that stops iterating
(client disconnect -> CancelledError / GeneratorExit) aborts its request in the core, which
frees its KV blocks on its next step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from tokenmill.config import EngineConfig
from tokenmill.engine.core_client import EngineDeadError, make_core_client
from tokenmill.engine.interfaces import SchedulerStats
from tokenmill.engine.llm_engine import FrontEnd
from tokenmill.engine.output_processor import PromptType
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLM(FrontEnd):
    def __init__(self, config: EngineConfig, chat_template: str | None = None,
                 in_process: bool = False):
        super().__init__(config, chat_template)
        self.client = make_core_client(config, in_process)
        self.num_kv_blocks = self.client.num_kv_blocks
        self.stats = SchedulerStats()
        # Called with every step's SchedulerStats (the server's metrics hook in here).
        self.stats_listeners: list[Callable[[SchedulerStats], None]] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None
        self.errored: BaseException | None = None

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: str,
                    priority: int = 0) -> asyncio.Queue:
        """Validate and submit a request now (bad input raises ValueError here, before any
        response is started); returns the queue ``stream_outputs`` reads."""
        if self.errored is not None:
            raise EngineDeadError(str(self.errored))
        self._ensure_loop()
        text, ids, children = self.input_processor.process(request_id, prompt, params, priority)
        q: asyncio.Queue = asyncio.Queue()
        self.output_processor.add_request(request_id, text, ids, params, children,
                                          sink=q.put_nowait)
        self._queues[request_id] = q
        try:
            self.client.add_requests(children)
        except BaseException:
            self._queues.pop(request_id, None)
            self.output_processor.abort(request_id)
            raise
        return q

    async def stream_outputs(self, request_id: str, q: asyncio.Queue
                             ) -> AsyncIterator[RequestOutput]:
        """Yield a submitted request's outputs until it finishes; leaving early aborts it."""
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs for one request until it finishes (kind per params)."""
        q = self.add_request(prompt, params, request_id, priority)
        async for out in self.stream_outputs(request_id, q):
            yield out

    async def abort(self, request_id: str) -> None:
        self.abort_request(request_id)

    def abort_request(self, request_id: str) -> None:
        """Abort a request whether or not its outputs are being read."""
        self._queues.pop(request_id, None)
        self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> None:
        child_ids = self.output_processor.abort(request_id)
        if child_ids and self.errored is None:
            try:
                self.client.abort(child_ids)
            except EngineDeadError:
                pass

    # ------------------------------------------------------------------ output loop
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._output_loop())

    async def _output_loop(self) -> None:
        try:
            while True:
                outs = await self.client.get_outputs()
                if outs.stats is not None:
                    self.stats = outs.stats
                    for listener in self.stats_listeners:
                        listener(outs.stats)
                _, to_abort = self.output_processor.process(outs.outputs)
                if to_abort:
                    self.client.abort(to_abort)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the core is gone: nobody may wait forever
            logger.error("engine core failed: %s", e)
            self.errored = e if isinstance(e, EngineDeadError) else EngineDeadError(str(e))
            for q in list(self._queues.values()):
                q.put_nowait(self.errored)

    # ------------------------------------------------------------------ health, shutdown
    @property
    def is_alive(self) -> bool:
        return self.errored is None and self.client.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    async def check_health(self) -> None:
        if not self.is_alive:
            raise EngineDeadError("the engine core is not running")

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.client.shutdown()
