"""HTTP routes: validate, delegate to the serving classes, return. One router per family."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill import __version__
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.server.errors import APIError, api_error_from, error_body
from tokenmill.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, GenerateRequest, TokenizeRequest,
    random_id)
from tokenmill.server.serving import ServingContext
from tokenmill.server.serving_chat import render_chat_prompt
from tokenmill.server.metrics import CONTENT_TYPE_LATEST

openai_router = APIRouter()
misc_router = APIRouter()


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


def _request_id(request: Request, prefix: str) -> str:
    return f"{prefix}-{request.state.request_id}"


async def until_disconnect(request: Request, coro):
    """Run a handler, but cancel it (aborting its engine request) if the client leaves."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        try:
            return task.result()
        except Exception as e:
            # NOTE: raise as APIError so the envelope is built inside the middleware stack
            # (a bare exception would reach Starlette's outermost handler, past X-Request-Id).
            raise api_error_from(e) from e
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return Response(status_code=499)


def _respond(result):
    if hasattr(result, "__aiter__"):
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    if isinstance(result, Response):
        return result
    return JSONResponse(result.model_dump())


# --------------------------------------------------------------------------- OpenAI
@openai_router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    server = request.app.state.completion_server
    result = await until_disconnect(request, server.create(body, _request_id(request, "cmpl")))
    return _respond(result)


@openai_router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    server = request.app.state.chat_server
    result = await until_disconnect(request, server.create(body, _request_id(request,
                                                                             "chatcmpl")))
    return _respond(result)


@openai_router.get("/v1/models")
async def list_models(request: Request):
    ctx = _ctx(request)
    created = int(request.app.state.started)
    data = [{"id": name, "object": "model", "created": created, "owned_by": "tokenmill",
             "root": ctx.model_path, "parent": None, "max_model_len": ctx.max_model_len}
            for name in ctx.served_names]
    return {"object": "list", "data": data}


@openai_router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    for m in (await list_models(request))["data"]:
        if m["id"] == model_id:
            return m
    raise APIError(404, f"The model `{model_id}` does not exist.", param="model",
                   code="model_not_found")


# --------------------------------------------------------------------------- misc
@misc_router.get("/health")
async def health(request: Request):
    ctx = _ctx(request)
    if ctx.draining or not ctx.engine.is_alive:
        return Response(status_code=503)
    return Response(status_code=200)


@misc_router.get("/version")
async def version():
    return {"version": __version__}


@misc_router.get("/metrics")
async def metrics(request: Request):
    return Response(_ctx(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@misc_router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    ctx = _ctx(request)
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        text = render_chat_prompt(ctx, body)
        ids = ctx.tokenize(text, add_special_tokens=False)
    else:
        ids = ctx.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
    out = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = ctx.tokenizer.convert_ids_to_tokens(ids)
    return out


@misc_router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    ctx = _ctx(request)
    ctx.check_model(body.model)
    vocab = len(ctx.tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < max(vocab, ctx.engine.hf_config.vocab_size)]
    if bad:
        raise APIError(400, f"token id {bad[0]} is out of vocabulary", param="tokens")
    return {"prompt": ctx.tokenizer.decode(body.tokens)}


# --------------------------------------------------------------------------- legacy
@misc_router.post("/generate")
async def legacy_generate(body: GenerateRequest, request: Request):
    """The old vLLM demo API: {"prompt", "stream", sampling fields} -> {"text": [...]}."""
    ctx = _ctx(request)
    if not body.prompt:
        raise APIError(400, "prompt must be a non-empty string", param="prompt")
    fields = body.model_dump(exclude={"prompt", "stream"}, exclude_unset=False)
    ids = ctx.tokenize(body.prompt)
    fields["max_tokens"] = ctx.resolve_max_tokens(body.max_tokens, len(ids))
    kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
    try:
        params = SamplingParams(**fields, output_kind=kind)
    except (TypeError, ValueError) as e:
        raise api_error_from(ValueError(str(e))) from None
    ctx.check_capacity()
    outputs = ctx.submit({"prompt": body.prompt, "prompt_token_ids": ids}, params,
                         random_id("gen"))

    if body.stream:
        async def lines():
            texts = [""] * body.n  # each line carries the whole text so far, per sample
            try:
                async for out in outputs:
                    for c in out.outputs:
                        texts[c.index] += c.text
                    yield (json.dumps({"text": [body.prompt + t for t in texts]}) + "\n").encode()
            except Exception as e:  # noqa: BLE001 - after the stream started: an error line
                err = api_error_from(e)
                yield (json.dumps(error_body(err.status, err.message)) + "\n").encode()
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def whole():
        final = None
        async for out in outputs:
            final = out
        return JSONResponse({"text": [body.prompt + c.text for c in final.outputs]})
    return await until_disconnect(request, whole())


__all__ = ["openai_router", "misc_router"]
