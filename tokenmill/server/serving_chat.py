"""POST /v1/chat/completions: messages through the chat template, streamed or whole."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.server.errors import APIError, api_error_from, error_body
from tokenmill.server.protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
    ChatMessage, ChatResponseMessage, ChatStreamChoice, ChatTokenLogprob, DeltaMessage,
    PromptTokensDetails, TopLogprob, Usage, to_sampling_params)
from tokenmill.server.serving import ServingContext, chosen_and_top
from tokenmill.server.sse import sse_done, sse_event
from tokenmill.tokenizer import apply_chat_template

MAX_TOP_LOGPROBS = 20


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template wants them; content parts joined into text."""
    if not messages:
        raise APIError(400, "messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are "
                                   f"supported, got type {part.get('type')!r}",
                                   param=f"messages.{i}.content")
                texts.append(part["text"])
            d["content"] = "".join(texts)
        elif m.content is None and m.role != "assistant":
            d["content"] = ""
        out.append(d)
    return out


def render_chat_prompt(ctx: ServingContext, req) -> str:
    kwargs = dict(req.chat_template_kwargs or {})
    tools = getattr(req, "tools", None) if getattr(req, "tool_choice", None) != "none" else None
    try:
        return apply_chat_template(
            ctx.tokenizer, message_dicts(req.messages),
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, tools=tools,
            chat_template=getattr(req, "chat_template", None), **kwargs)
    except APIError:
        raise
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    except Exception as e:  # jinja errors: the template rejected these messages
        raise APIError(400, f"the chat template could not render these messages: {e}",
                       param="messages") from e


def _chat_logprobs(ctx: ServingContext, c: CompletionOutput, k: int) -> ChatLogprobs:
    content = []
    for tid, pos in zip(c.token_ids, c.logprobs or []):
        chosen, top = chosen_and_top(pos, tid, k)
        text = chosen.decoded_token if chosen and chosen.decoded_token is not None else \
            ctx.tokenizer.decode([tid])
        content.append(ChatTokenLogprob(
            token=text, logprob=chosen.logprob if chosen else float("-inf"),
            bytes=list(text.encode()),
            top_logprobs=[TopLogprob(token=t.decoded_token or "", logprob=t.logprob,
                                     bytes=list((t.decoded_token or "").encode()))
                          for _, t in top]))
    return ChatLogprobs(content=content)


class ChatServer:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, request_id: str):
        ctx = self.ctx
        ctx.check_model(req.model)
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true",
                               param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]",
                               param="top_logprobs")
        ctx.check_capacity()
        text = render_chat_prompt(ctx, req)
        ids = ctx.tokenize(text, add_special_tokens=False)
        ctx.check_token_ids(ids)
        want = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        max_tokens = ctx.resolve_max_tokens(want, len(ids))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = to_sampling_params(req, max_tokens=max_tokens, logprobs=logprobs,
                                    defaults=ctx.engine.generation_defaults.sampling,
                                    stream=req.stream)
        outputs = ctx.submit({"prompt": text, "prompt_token_ids": ids}, params, request_id,
                             req.priority)
        if req.stream:
            return self._stream(req, request_id, outputs)
        final = None
        async for out in outputs:
            final = out
        return self._response(req, request_id, final)

    def _response(self, req, request_id: str, out: RequestOutput) -> ChatCompletionResponse:
        choices = []
        completion = 0
        for c in out.outputs:
            logprobs = _chat_logprobs(self.ctx, c, req.top_logprobs or 0) if req.logprobs \
                else None
            choices.append(ChatChoice(index=c.index,
                                      message=ChatResponseMessage(content=c.text),
                                      logprobs=logprobs, finish_reason=c.finish_reason,
                                      stop_reason=c.stop_reason))
            completion += len(c.token_ids)
        prompt = len(out.prompt_token_ids)
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion,
                      total_tokens=prompt + completion,
                      prompt_tokens_details=PromptTokensDetails(
                          cached_tokens=out.num_cached_tokens))
        return ChatCompletionResponse(id=request_id, model=self.ctx.model_name,
                                      choices=choices, usage=usage)

    async def _stream(self, req, request_id: str, outputs) -> AsyncIterator[str]:
        model = self.ctx.model_name
        created = int(time.time())
        started: set[int] = set()
        prompt_tokens = completion = cached = 0

        def chunk(choice: ChatStreamChoice) -> str:
            c = ChatCompletionChunk(id=request_id, created=created, model=model,
                                    choices=[choice]).model_dump(exclude={"usage"})
            for ch in c["choices"]:  # a delta carries only what changed, as OpenAI's do
                ch["delta"] = {k: v for k, v in ch["delta"].items() if v is not None}
            return sse_event(c)

        try:
            async for out in outputs:
                prompt_tokens = len(out.prompt_token_ids)
                for c in out.outputs:
                    if c.index not in started:  # the first chunk of a choice names the role
                        started.add(c.index)
                        yield chunk(ChatStreamChoice(index=c.index, delta=DeltaMessage(
                            role="assistant", content="")))
                    completion += len(c.token_ids)
                    logprobs = _chat_logprobs(self.ctx, c, req.top_logprobs or 0) \
                        if req.logprobs else None
                    if c.text or logprobs and logprobs.content or c.finish_reason:
                        delta = DeltaMessage(content=c.text) if c.text else DeltaMessage()
                        yield chunk(ChatStreamChoice(index=c.index, delta=delta,
                                                     logprobs=logprobs,
                                                     finish_reason=c.finish_reason,
                                                     stop_reason=c.stop_reason))
                if out.finished:
                    cached = out.num_cached_tokens
            if req.stream_options and req.stream_options.include_usage:
                usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                              total_tokens=prompt_tokens + completion,
                              prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))
                last = ChatCompletionChunk(id=request_id, created=created, model=model,
                                           choices=[], usage=usage)
                yield sse_event(last.model_dump())
        except Exception as e:  # after the stream started: an error frame, then [DONE]
            err = api_error_from(e)
            yield sse_event(error_body(err.status, err.message, param=err.param, code=err.code))
        yield sse_done()
