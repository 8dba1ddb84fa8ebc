"""What every endpoint shares: the engine, model names, limits, metrics, request logging.

Handlers call ``ServingContext`` to validate (model name, capacity, context length) and to run a
request through the engine (``generate``), which records metrics and the request log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from tokenmill.config import ServerConfig
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.outputs import Logprob, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import ServerMetrics

logger = logging.getLogger("tokenmill.server")

MAX_LOGPROBS = 20


class ServingContext:
    def __init__(self, engine: AsyncLLM, config: ServerConfig, model_path: str):
        self.engine = engine
        self.config = config
        self.model_path = model_path
        self.served_names = config.served_model_name or [model_path]
        self.model_name = self.served_names[0]
        self.metrics = ServerMetrics(self.model_name)
        engine.stats_listeners.append(self.metrics.record_stats)
        self.draining = False

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ------------------------------------------------------------------ checks
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")

    def check_capacity(self) -> None:
        limit = self.config.max_queued_requests
        if limit is None:
            return
        waiting = self.engine.num_in_flight - self.engine.stats.num_running
        if waiting >= limit:
            raise APIError(429, f"too many requests are waiting ({waiting}); retry later",
                           code="queue_full")

    def resolve_max_tokens(self, requested: int | None, prompt_len: int) -> int:
        """The engine's max_tokens for one prompt; 400 when the context cannot hold it."""
        mml = self.max_model_len
        if requested is not None and requested < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {requested}",
                           param="max_tokens")
        if prompt_len >= mml:
            raise APIError(400, f"This model's maximum context length is {mml} tokens. "
                           f"However, your prompt has {prompt_len} tokens. Please reduce "
                           f"the length of the prompt.", param="messages",
                           code="context_length_exceeded")
        room = mml - prompt_len
        if requested is None:
            return room
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {mml} tokens. "
                           f"However, you requested {prompt_len + requested} tokens "
                           f"({prompt_len} in the messages, {requested} in the completion). "
                           f"Please reduce the length of the messages or completion.",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_token_ids(self, ids: list[int]) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        vocab = self.engine.hf_config.vocab_size
        for t in ids:
            if not 0 <= t < vocab:
                raise APIError(400, f"token id {t} is out of vocabulary (size {vocab})",
                               param="prompt")

    # ------------------------------------------------------------------ running
    def submit(self, prompt: dict, params: SamplingParams, request_id: str,
               priority: int = 0) -> "Submitted":
        """Admit a request now (bad input raises here, while a 4xx can still be sent) and
        return its outputs, with per-request metrics and the request log line.

        The engine id gets a unique suffix: clients may reuse an X-Request-Id concurrently.
        """
        self.check_params(params)
        engine_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        q = self.engine.add_request(prompt, params, engine_id, priority)
        return Submitted(self, request_id, engine_id, q)

    async def _follow(self, request_id: str, engine_id: str, q) -> AsyncIterator[RequestOutput]:
        gen_tokens = 0
        reasons: list[str] = []
        finished = None
        # NOTE: the server asks for DELTA or FINAL_ONLY outputs, so summing what each output
        # carries counts every token and every choice's finish exactly once.
        async for out in self.engine.stream_outputs(engine_id, q):
            for c in out.outputs:
                gen_tokens += len(c.token_ids)
                if c.finish_reason is not None:
                    reasons.append(c.finish_reason)
            if out.finished:
                finished = out
            yield out
        if finished is not None:
            self._record(request_id, finished, gen_tokens, reasons)

    def _record(self, request_id: str, out: RequestOutput, gen_tokens: int,
                reasons: list[str]) -> None:
        # Token times are taken as the engine's outputs arrive, so they are the same for
        # streamed and whole responses.
        m = out.metrics
        arrival, first = m["arrival_time"], m.get("first_token_time")
        e2e = (m.get("last_token_time") or time.monotonic()) - arrival
        for gap in m.get("inter_token_latencies", ()):
            self.metrics.itl.observe(gap)
        self.metrics.record_finished(
            prompt_tokens=len(out.prompt_token_ids), generation_tokens=gen_tokens,
            finish_reasons=reasons, e2e=e2e, ttft=None if first is None else first - arrival,
            queue_time=m.get("queue_time"))
        if not self.config.disable_log_requests:
            logger.info("request %s: prompt %d tokens, generated %d tokens, %.3fs", request_id,
                        len(out.prompt_token_ids), gen_tokens, e2e)

    def check_params(self, params: SamplingParams) -> None:
        if params.prompt_logprobs is not None and params.prompt_logprobs > MAX_LOGPROBS:
            raise APIError(400, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
                           param="prompt_logprobs")


class Submitted:
    """A request in the engine: iterate it for its outputs, or abort it unread."""

    def __init__(self, ctx: ServingContext, request_id: str, engine_id: str, q):
        self.ctx, self.request_id, self.engine_id, self.q = ctx, request_id, engine_id, q

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self.ctx._follow(self.request_id, self.engine_id, self.q)

    def abort(self) -> None:
        self.ctx.engine.abort_request(self.engine_id)


def abort_all(submitted: list[Submitted]) -> None:
    for s in submitted:
        s.abort()


async def merge(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators, yielding (which, item) as items arrive."""
    if len(iterators) == 1:  # the common case (n=1, one prompt): no queue, no extra task
        it = iterators[0]
        try:
            async for item in it:
                yield 0, item
        finally:
            if hasattr(it, "aclose"):
                await it.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, it):
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def prompt_logprobs_json(positions) -> list | None:
    """vLLM's prompt_logprobs shape: per prompt token, None (the first) or
    {token_id: {"logprob", "rank", "decoded_token"}}."""
    if positions is None:
        return None
    return [None if pos is None else
            {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in pos.items()} for pos in positions]


def chosen_and_top(pos: dict[int, Logprob], token_id: int, k: int):
    """The chosen token's Logprob and the top-k (by rank) of one position."""
    chosen = pos.get(token_id)
    top = sorted(pos.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
    top = [(t, lp) for t, lp in top if lp.rank is not None and 1 <= lp.rank <= k] if k else []
    return chosen, top
