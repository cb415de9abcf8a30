"""tenacity, paid for only when a first attempt failed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying

T = TypeVar("T")


async def retried(call: Callable[[], Awaitable[T]], retrying: Callable[[], AsyncRetrying]) -> T:
    """`await call()`, retried as `retrying()` says if it raises (a policy on exceptions: a
    result is not looked at).

    The first attempt runs bare. Only when it fails is the AsyncRetrying built, and it starts by
    counting that failure as its own first attempt: attempt counts, waits and the decision to retry
    are what they would have been had it run every attempt. Its clock starts then too: a time
    limit that must include the first attempt is the caller's to shorten (see
    Worker._store_call). Building one per call otherwise cost about 40 µs and some 30 objects in
    reference cycles (a threading.local, a concurrent Future with its lock, the retry state), which
    only the cyclic garbage collector frees: at hundreds of requests per second the worker's memory
    grew for a minute before the collector caught up. Nearly every call succeeds at once."""
    try:
        return await call()
    except Exception as exc:  # noqa: BLE001 - `retrying` decides what is retried; the rest it re-raises
        failure: Exception | None = exc

    async def attempt() -> T:
        nonlocal failure
        if failure is not None:
            first, failure = failure, None
            try:
                raise first
            finally:
                del first  # not kept by this frame, which its traceback holds
        return await call()

    return await retrying()(attempt)
