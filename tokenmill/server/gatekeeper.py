"""The gate in front of every route, as plain ASGI middleware.

It gives each request an id (the client's ``X-Request-Id``, else a fresh one, echoed back),
refuses new work while draining (503) and checks the API key (401) on every path but the open
ones. Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: that one pipes every response
body chunk through an extra memory stream and task switch, which cost a streaming server ~1/4
of its front-end CPU (one chunk per token per client; BENCHMARKS.md).
"""

from __future__ import annotations

import hmac
import uuid

from tokenmill.server.errors import error_response

OPEN_PATHS = ("/health", "/metrics", "/version")


class Gatekeeper:
    def __init__(self, app, ctx, api_key: str | None):
        self.app = app
        self.ctx = ctx
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), rid_header]
            await send(message)

        path = _route_path(scope)
        if path not in OPEN_PATHS:
            refusal = None
            if self.ctx.draining:
                refusal = error_response(503, "the server is shutting down",
                                         code="shutting_down")
            elif self.api_key and not self._authorized(headers.get(b"authorization", b"")):
                refusal = error_response(401, "invalid or missing API key (send "
                                         "'Authorization: Bearer KEY')", code="invalid_api_key")
            if refusal is not None:
                return await refusal(scope, receive, send_with_id)
        await self.app(scope, receive, send_with_id)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)


def _route_path(scope) -> str:
    """The path without the app's root_path (some servers put it in ``path``, some don't)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path
