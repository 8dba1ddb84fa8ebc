"""The app factory and the process that runs it under uvicorn.

    build_app(engine, config) -> FastAPI   (routers + middlewares + error envelope; no globals:
                                            everything hangs off app.state)
    run_server(engine_config, server_config)  loads the engine, serves, drains on SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import time

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.server.errors import install_error_handlers
from tokenmill.server.gatekeeper import Gatekeeper
from tokenmill.server.routes import misc_router, openai_router
from tokenmill.server.serving import ServingContext
from tokenmill.server.serving_chat import ChatServer
from tokenmill.server.serving_completion import CompletionServer

logger = logging.getLogger("tokenmill.server")


def build_app(engine: AsyncLLM, config: ServerConfig, model_path: str) -> FastAPI:
    app = FastAPI(title="tokenmill", version="0.1.0", root_path=config.root_path or "")
    ctx = ServingContext(engine, config, model_path)
    app.state.ctx = ctx
    app.state.completion_server = CompletionServer(ctx)
    app.state.chat_server = ChatServer(ctx)
    app.state.started = time.time()
    app.include_router(openai_router)
    app.include_router(misc_router)
    install_error_handlers(app)
    app.add_middleware(Gatekeeper, ctx=ctx, api_key=config.api_key)

    if config.allowed_origins:
        # Added last, so it is outermost: CORS preflights never reach the key check.
        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins,
                           allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    return app


class _DrainingServer(uvicorn.Server):
    """uvicorn, but a SIGTERM first flips the app to 'draining' (new requests get 503)."""

    def __init__(self, config: uvicorn.Config, ctx: ServingContext):
        super().__init__(config)
        self.ctx = ctx

    def handle_exit(self, sig, frame) -> None:
        if not self.ctx.draining:
            logger.info("shutting down: draining %d in-flight requests (grace %.0fs)",
                        self.ctx.engine.num_in_flight, self.config.timeout_graceful_shutdown)
        self.ctx.draining = True
        super().handle_exit(sig, frame)


def run_server(engine_config: EngineConfig, config: ServerConfig) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = AsyncLLM(engine_config, chat_template=config.chat_template)
    model_path = engine_config.model.model
    try:
        app = build_app(engine, config, model_path)
        ctx: ServingContext = app.state.ctx
        blocks, bs = engine.num_kv_blocks, engine_config.cache.block_size
        scheme = "https" if config.ssl_certfile else "http"
        logger.info("model %s (served as %s), max_model_len %d", model_path,
                    ", ".join(ctx.served_names), engine.max_model_len)
        logger.info("KV cache: %d blocks x %d tokens = %d tokens", blocks, bs, blocks * bs)
        logger.info("serving on %s://%s:%d", scheme, config.host, config.port)
        uv = uvicorn.Config(app, host=config.host, port=config.port,
                            ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
                            root_path=config.root_path or "", log_level="warning",
                            timeout_graceful_shutdown=config.shutdown_grace_period,
                            access_log=False)
        # NOTE: uvicorn re-raises the signal it caught once it has drained; with the default
        # handler that would kill us before the engine core is shut down (and exit 143).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        _DrainingServer(uv, ctx).run()
    finally:
        engine.shutdown()
    return 0
