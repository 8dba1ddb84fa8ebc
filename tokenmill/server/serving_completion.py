"""POST /v1/completions: one or many prompts, n samples each, streamed or whole."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import (
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
    PromptTokensDetails, Usage, to_sampling_params)
from tokenmill.server.serving import (
    ServingContext, abort_all, chosen_and_top, merge, prompt_logprobs_json)
from tokenmill.server.sse import sse_done, sse_event

MAX_LOGPROBS = 20


def _prompts(ctx: ServingContext, prompt) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        items = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    out = []
    for p in items:
        if isinstance(p, str):
            ids = ctx.tokenize(p)
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            out.append((p, ids))
        else:
            ctx.check_token_ids(p)
            out.append((None, list(p)))
    return out


def _logprobs(ctx: ServingContext, token_ids: list[int], positions, k: int,
              offset: int) -> CompletionLogprobs:
    lp = CompletionLogprobs()
    for tid, pos in zip(token_ids, positions):
        text = ctx.tokenizer.decode([tid])
        lp.tokens.append(text)
        lp.text_offset.append(offset)
        offset += len(text)
        if pos is None:  # the first prompt token has no logprob
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
            continue
        chosen, top = chosen_and_top(pos, tid, k)
        lp.token_logprobs.append(chosen.logprob if chosen else None)
        lp.top_logprobs.append({(t.decoded_token or ""): t.logprob for _, t in top})
    return lp


class CompletionServer:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: CompletionRequest, request_id: str):
        ctx = self.ctx
        ctx.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported", param="best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        ctx.check_capacity()
        prompts = _prompts(ctx, req.prompt)
        jobs = []
        for i, (text, ids) in enumerate(prompts):
            max_tokens = ctx.resolve_max_tokens(req.max_tokens, len(ids))
            params = to_sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs,
                                        defaults=ctx.engine.generation_defaults.sampling,
                                        stream=req.stream)
            if req.echo and req.logprobs is not None and params.prompt_logprobs is None:
                params = params.clone(prompt_logprobs=req.logprobs)
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            jobs.append((text, ids, params, rid))
        iters = []
        try:
            for text, ids, params, rid in jobs:
                iters.append(ctx.submit({"prompt": text, "prompt_token_ids": ids}, params, rid,
                                        req.priority))
        except BaseException:
            abort_all(iters)  # an earlier prompt of this request is already running
            raise
        if req.stream:
            return self._stream(req, request_id, jobs, iters)
        finals: list[RequestOutput | None] = [None] * len(jobs)
        async for i, out in merge(iters):
            finals[i] = out
        return self._response(req, request_id, finals)

    # ------------------------------------------------------------------ whole response
    def _choice(self, req, out: RequestOutput, c: CompletionOutput, index: int,
                echo_text: str | None) -> CompletionChoice:
        text = c.text
        logprobs = None
        if req.logprobs is not None:
            ids, positions, prefix = list(c.token_ids), list(c.logprobs or []), 0
            if req.echo:
                ids = out.prompt_token_ids + ids
                positions = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) \
                    + positions
            logprobs = _logprobs(self.ctx, ids, positions, req.logprobs, prefix)
        if echo_text is not None:
            text = echo_text + text
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                prompt_logprobs=prompt_logprobs_json(out.prompt_logprobs))

    def _echo_text(self, req, out: RequestOutput) -> str | None:
        if not req.echo:
            return None
        return out.prompt if out.prompt is not None else \
            self.ctx.tokenizer.decode(out.prompt_token_ids)

    def _response(self, req, request_id, finals: list[RequestOutput]) -> CompletionResponse:
        choices, usage = [], Usage(prompt_tokens_details=PromptTokensDetails())
        for i, out in enumerate(finals):
            echo = self._echo_text(req, out)
            for c in out.outputs:
                choices.append(self._choice(req, out, c, i * req.n + c.index, echo))
                usage.completion_tokens += len(c.token_ids)
            usage.prompt_tokens += len(out.prompt_token_ids)
            usage.prompt_tokens_details.cached_tokens += out.num_cached_tokens
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(id=request_id, model=self.ctx.model_name, choices=choices,
                                  usage=usage)

    # ------------------------------------------------------------------ streaming
    async def _stream(self, req, request_id, jobs, iters) -> AsyncIterator[str]:
        created = CompletionResponse(id=request_id, model="", choices=[]).created
        usage = Usage(prompt_tokens_details=PromptTokensDetails())
        echoed: set[int] = set()
        offsets: dict[int, int] = {}
        try:
            async for i, out in merge(iters):
                if i not in echoed:
                    usage.prompt_tokens += len(out.prompt_token_ids)
                for c in out.outputs:
                    index = i * req.n + c.index
                    first = index not in offsets
                    text = c.text
                    logprobs = None
                    if req.echo and first:
                        text = (self._echo_text(req, out) or "") + text
                    if req.logprobs is not None:
                        logprobs = _logprobs(self.ctx, c.token_ids, c.logprobs or [],
                                             req.logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(text)
                    usage.completion_tokens += len(c.token_ids)
                    choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                              finish_reason=c.finish_reason,
                                              stop_reason=c.stop_reason)
                    if first:  # prompt logprobs ride on a choice's first chunk
                        choice.prompt_logprobs = prompt_logprobs_json(out.prompt_logprobs)
                    chunk = CompletionResponse(id=request_id, created=created,
                                               model=self.ctx.model_name, choices=[choice])
                    yield sse_event(chunk.model_dump(exclude={"usage"}))
                echoed.add(i)
                if out.finished:
                    usage.prompt_tokens_details.cached_tokens += out.num_cached_tokens
            if req.stream_options and req.stream_options.include_usage:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                chunk = CompletionResponse(id=request_id, created=created,
                                           model=self.ctx.model_name, choices=[], usage=usage)
                yield sse_event(chunk.model_dump())
        except Exception as e:  # after the stream started: an error frame, then [DONE]
            from tokenmill.server.errors import api_error_from, error_body

            err = api_error_from(e)
            yield sse_event(error_body(err.status, err.message, param=err.param, code=err.code))
        yield sse_done()
