"""The one exception tree. Every error says what the caller should change.

    Step1XError
    ├── ConfigError            settings are wrong: fix the environment / profile
    ├── InvalidInput           a request is wrong: fix the named item and field (HTTP 422)
    │   ├── InvalidImage       bytes that are not a usable image, or sizes that disagree
    │   └── TooLarge           a request body or upload over its size limit (HTTP 413)
    ├── TooManyRequests        wait Retry-After seconds: the tenant's backlog is full, or too many
    │                          failed attempts came from one address (HTTP 429)
    ├── NotFound               no such resource for this tenant (HTTP 404, also across tenants)
    ├── Conflict               the request clashes with existing state (HTTP 409)
    ├── ServiceUnavailable     a backing service (database, Redis, S3) cannot be reached (HTTP 503,
    │                          with Retry-After)
    └── EngineError            a model failed on a job; the job fails with this message
        └── ModelNotAvailable  a profile's weights are missing: pull or configure them
"""

from __future__ import annotations

from dataclasses import dataclass


class Step1XError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(Step1XError):
    pass


@dataclass
class FieldError:
    """One problem in one field of one item; `item` is the custom_id (or index) it belongs to."""

    field: str
    message: str
    item: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"item": self.item, "field": self.field, "message": self.message}

    def __str__(self) -> str:
        where = f"item {self.item!r}: " if self.item is not None else ""
        return f"{where}{self.field}: {self.message}"


class InvalidInput(Step1XError):
    def __init__(self, errors: list[FieldError] | str, field: str = "request") -> None:
        self.errors = errors if isinstance(errors, list) else [FieldError(field, errors)]
        super().__init__("; ".join(str(e) for e in self.errors[:20]))


class InvalidImage(InvalidInput):
    pass


class TooLarge(InvalidInput):
    pass


class TooManyRequests(Step1XError):
    def __init__(self, message: str, retry_after: int, field: str = "request") -> None:
        self.retry_after = retry_after
        self.field = field
        super().__init__(message)


class NotFound(Step1XError):
    pass


class Conflict(Step1XError):
    """`field`: what clashes (the Idempotency-Key of a replay with another body, a batch's state)."""

    def __init__(self, message: str, field: str = "request") -> None:
        self.field = field
        super().__init__(message)


class ServiceUnavailable(Step1XError):
    pass


class EngineError(Step1XError):
    pass


class ModelNotAvailable(EngineError, ConfigError):
    pass
