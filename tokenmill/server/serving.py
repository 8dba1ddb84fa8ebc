"""What every endpoint shares: the engine, model names, limits, metrics, request logging.

Handlers call ``ServingContext`` to validate (model name, capacity, context length) and to run a
request through the engine (``generate``), which records metrics and the request log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from tokenmill.config import ServerConfig
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.outputs import Logprob, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import ServerMetrics

logger = logging.getLogger("tokenmill.server")


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
    async def generate(self, prompt: dict, params: SamplingParams, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """engine.generate plus per-request metrics and the request log line."""
        start = time.monotonic()
        last = ttft = finished = None
        gen_tokens = 0
        reasons: list[str] = []
        # NOTE: the server asks for DELTA or FINAL_ONLY outputs, so summing what each output
        # carries counts every token and every choice's finish exactly once.
        async for out in self.engine.generate(prompt, params, request_id, priority):
            now = time.monotonic()
            if last is None:
                ttft = now - start
            else:
                self.metrics.itl.observe(now - last)
            last = now
            for c in out.outputs:
                gen_tokens += len(c.token_ids)
                if c.finish_reason is not None:
                    reasons.append(c.finish_reason)
            if out.finished:
                finished = out
            yield out
        if finished is None:
            return
        e2e = time.monotonic() - start
        self.metrics.record_finished(
            prompt_tokens=len(finished.prompt_token_ids), generation_tokens=gen_tokens,
            finish_reasons=reasons, e2e=e2e, ttft=ttft,
            queue_time=finished.metrics.get("queue_time"))
        if not self.config.disable_log_requests:
            logger.info("request %s: prompt %d tokens, generated %d tokens, %.3fs", request_id,
                        len(finished.prompt_token_ids), gen_tokens, e2e)


async def merge(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators, yielding (which, item) as items arrive."""
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


def chosen_and_top(pos: dict[int, Logprob], token_id: int, k: int):
    """The chosen token's Logprob and the top-k (by rank) of one position."""
    chosen = pos.get(token_id)
    top = sorted(pos.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))
    top = [(t, lp) for t, lp in top if lp.rank is not None and 1 <= lp.rank <= k] if k else []
    return chosen, top
