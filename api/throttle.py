"""Throttling of failed API-key checks, per client address, counted in Redis so that every API
process shares the count.

A fixed window: the first failure from an address starts `auth_failure_window` seconds, and past
`auth_failure_limit` failures in it that address gets 429 with Retry-After instead of 401. Only
failures are counted and only failing requests are answered 429: a valid key is never slowed,
even from an address that is being throttled (keys are 256 random bits: the throttle guards the
database against floods of guesses, not the keys against being found). If Redis is down the
throttle lets requests through rather than lock every client out.
"""

from __future__ import annotations

import logging

import redis
from starlette.requests import Request

from core.errors import TooManyRequests
from core.settings import Settings

log = logging.getLogger(__name__)


class AuthThrottle:
    def __init__(self, settings: Settings) -> None:
        self.limit = settings.auth_failure_limit
        self.window = settings.auth_failure_window
        self.client = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)

    def count_failure(self, request: Request) -> None:
        """Count a failed key check of `request`'s address; TooManyRequests once it is over the limit.
        The API and the dashboard's login form both count here."""
        wait = self.failed(request.client.host if request.client else "unknown")
        if wait is not None:
            raise TooManyRequests(f"too many failed API-key checks from your address: retry in {wait} s", wait,
                                  field="Authorization")

    def failed(self, address: str) -> int | None:
        """Count one failure from `address`; the seconds it must wait if it is now over the limit."""
        key = f"step1x:auth-failures:{address}"
        try:
            pipe = self.client.pipeline()
            pipe.incr(key)
            pipe.expire(key, self.window, nx=True)
            pipe.ttl(key)
            count, _, ttl = pipe.execute()
        except redis.RedisError as exc:
            log.warning("auth throttle unavailable (Redis): %s", exc)
            return None
        if int(count) <= self.limit:
            return None
        return max(1, int(ttl))
