"""Every error answers in one shape: `{"detail": str, "errors": [{"item", "field", "message"}]}`.

Our own errors, FastAPI's validation, Starlette's HTTP errors (bad multipart, unknown routes) and
the failures of a backing service all go through here. A database, Redis or S3 that cannot be
reached is a 503 with Retry-After on every route (its driver's exception, wherever it is raised,
including the auth dependency), never a plain-text 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import botocore.exceptions
import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.schemas import ErrorOut
from core.errors import (
    Conflict,
    FieldError,
    InvalidInput,
    NotFound,
    ServiceUnavailable,
    TooLarge,
    TooManyRequests,
)
from core.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[Request, Any], Awaitable[JSONResponse]]

# OpenAPI: what every /v1 route may answer besides its success.
RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "a body that cannot be read (broken multipart)"},
    401: {"model": ErrorOut, "description": "missing, unknown or revoked API key"},
    404: {"model": ErrorOut, "description": "no such resource for this tenant"},
    409: {"model": ErrorOut, "description": "Idempotency-Key reused with a different body"},
    413: {"model": ErrorOut, "description": "the body or upload is over its size limit"},
    422: {"model": ErrorOut, "description": "invalid input: `errors` names every bad item and field"},
    429: {"model": ErrorOut, "description": "the tenant's queue is full (nothing was stored), or too many "
                                            "failed API-key checks from this address: retry after Retry-After"},
    503: {"model": ErrorOut, "description": "the database, Redis or S3 is down: retry after Retry-After seconds"},
}

# The field an HTTP error is about, when the error itself does not say.
_FIELD_OF_STATUS = {400: "body", 401: "Authorization", 404: "path", 405: "method", 413: "body"}

# Exceptions of the backing services' clients that mean "unreachable", by the service they name.
UNAVAILABLE: dict[type[Exception], str] = {
    ServiceUnavailable: "service",
    sqlalchemy.exc.OperationalError: "database",
    sqlalchemy.exc.InterfaceError: "database",
    sqlalchemy.exc.TimeoutError: "database",
    redis.exceptions.ConnectionError: "redis",
    redis.exceptions.TimeoutError: "redis",
    botocore.exceptions.ConnectionError: "s3",
    botocore.exceptions.HTTPClientError: "s3",
}


class _AsciiJSON(JSONResponse):
    """Errors quote the input, which may hold a lone surrogate ("\\ud800" in the request's JSON):
    UTF-8 cannot encode one, so the answer is written in ASCII with escapes, as valid JSON."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(status: int, errors: list[FieldError], detail: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorOut(detail=detail or "; ".join(str(e) for e in errors[:20]), errors=[e.as_dict() for e in errors])
    return _AsciiJSON(body.model_dump(), status_code=status, headers=headers)


def _validation_error(error: dict[str, Any]) -> FieldError:
    if error["type"] == "json_invalid":  # its loc is a character offset, not a field
        return FieldError("body", f"not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
    loc = [p for p in error["loc"] if p != "body"]
    if len(loc) >= 2 and loc[0] == "items" and isinstance(loc[1], int):  # one item: named as "#index"
        return FieldError(".".join(str(p) for p in loc[2:]) or "item", error["msg"], f"#{loc[1]}")
    return FieldError(".".join(str(p) for p in loc) or "body", error["msg"])


def install(app: FastAPI, settings: Settings) -> None:
    retry = {"Retry-After": str(settings.unavailable_retry_after)}

    async def invalid(_: Request, exc: InvalidInput) -> JSONResponse:
        return error_response(413 if isinstance(exc, TooLarge) else 422, exc.errors)

    async def malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, [_validation_error(e) for e in exc.errors()])

    async def http(_: Request, exc: HTTPException) -> JSONResponse:
        error = FieldError(_FIELD_OF_STATUS.get(exc.status_code, "request"), str(exc.detail))
        return error_response(exc.status_code, [error], headers=dict(exc.headers or {}))

    def plain(status: int, field: str) -> Handler:
        async def handler(_: Request, exc: Exception) -> JSONResponse:
            return error_response(status, [FieldError(field, str(exc))])
        return handler

    async def conflict(_: Request, exc: Conflict) -> JSONResponse:
        return error_response(409, [FieldError(exc.field, str(exc))])

    async def throttled(_: Request, exc: TooManyRequests) -> JSONResponse:
        return error_response(429, [FieldError(exc.field, str(exc))],
                              headers={"Retry-After": str(exc.retry_after)})

    async def unstorable(_: Request, exc: sqlalchemy.exc.DataError) -> JSONResponse:
        # Validation should have caught it; if a value still reaches the database and is refused
        # there, it is the request's fault, not a server error.
        log.warning("the database refused a value: %s", exc.orig)
        return error_response(422, [FieldError("request", "a value cannot be stored (invalid characters "
                                                          "or a number out of range)")])

    def unavailable(service: str) -> Handler:
        async def handler(_: Request, exc: Exception) -> JSONResponse:
            name = service if service != "service" else "a backing service"
            log.warning("%s unavailable: %s", name, exc)
            return error_response(503, [FieldError(service, f"the {name} is unavailable: retry later")],
                                  headers=retry)
        return handler

    handlers: list[tuple[type[Exception], Callable[..., Awaitable[JSONResponse]]]] = [
        (InvalidInput, invalid), (RequestValidationError, malformed), (HTTPException, http),
        (NotFound, plain(404, "path")), (Conflict, conflict),
        (TooManyRequests, throttled), (sqlalchemy.exc.DataError, unstorable),
        *((error, unavailable(service)) for error, service in UNAVAILABLE.items())]
    for error, handler in handlers:
        app.add_exception_handler(error, handler)
