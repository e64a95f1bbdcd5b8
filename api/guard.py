"""What every request body passes before a route sees it: a size limit, and strict JSON.

The size limit is checked on `Content-Length` before a byte is read, and again while the body
streams in (a chunked or lying client), so a 1 GB upload is refused after at most the limit.
JSON bodies are parsed once here by `core.limits.loads` (no NaN or Infinity, bounded nesting), so
no route, ours or a later one, can receive JSON that PostgreSQL or a recursive serializer would
choke on.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from core.errors import FieldError
from core.limits import loads
from core.settings import Settings

# Room for the multipart framing around an upload of max_upload_bytes.
MULTIPART_OVERHEAD = 64 * 1024


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes its limit. An HTTPException, so FastAPI's body
    parsing lets it through to the error handlers instead of calling it a parse error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the {limit}-byte limit for this endpoint")


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit(self, path: str) -> int:
        if path.rstrip("/") == "/v1/files":
            return self.settings.max_upload_bytes + MULTIPART_OVERHEAD
        if path.rstrip("/") == "/v1/batches/manifest":
            return self.settings.max_manifest_bytes
        return self.settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if length.isascii() and length.isdigit() and int(length) > limit:
            await error_response(413, [FieldError("body", BodyTooLarge(limit).detail)])(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            app_receive: Receive = limited
            if _is_json(headers.get("content-type", "")):
                body = await _read(limited)
                try:
                    if body:  # an empty body is the route's to judge (a GET sent with this header)
                        loads(body, self.settings.max_json_depth)
                except json.JSONDecodeError as exc:
                    await error_response(422, [FieldError("body", f"not valid JSON: {exc.msg}")])(
                        scope, receive, send)
                    return
                app_receive = _replay(body, receive)
            await self.app(scope, app_receive, tracked)
        except BodyTooLarge as exc:
            if started:
                raise
            await error_response(413, [FieldError("body", exc.detail)])(scope, receive, send)


def _is_json(content_type: str) -> bool:
    # As FastAPI decides which bodies to parse as JSON.
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def _read(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return dict(await receive())  # after the body: wait for the disconnect as usual

    return replay
