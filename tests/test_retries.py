"""worker.retries.retried: tenacity counts, waits and decides as if it had run every attempt, and
is only built once the first attempt failed."""

from __future__ import annotations

import asyncio

import pytest
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_fixed

from worker.retries import retried


class Flaky(Exception):
    pass


def script(*outcomes: object) -> tuple[list[object], object]:
    """A call that answers or raises each of `outcomes` in turn; the list records the calls."""
    calls: list[object] = []

    async def call() -> object:
        outcome = outcomes[len(calls)]
        calls.append(outcome)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return calls, call


def policy(attempts: int, slept: list[float], built: list[int]):
    def build() -> AsyncRetrying:
        built.append(1)

        async def sleep(seconds: float) -> None:
            slept.append(seconds)

        return AsyncRetrying(stop=stop_after_attempt(attempts), retry=retry_if_exception_type(Flaky),
                             wait=wait_fixed(0.25), sleep=sleep, reraise=True)
    return build


async def test_a_first_success_builds_no_retrying() -> None:
    calls, call = script("ok")
    slept: list[float] = []
    built: list[int] = []
    assert await retried(call, policy(3, slept, built)) == "ok"
    assert (len(calls), built, slept) == (1, [], [])


async def test_the_failed_first_attempt_counts_as_the_first_of_the_policy() -> None:
    calls, call = script(Flaky("1"), Flaky("2"), "ok")
    slept: list[float] = []
    built: list[int] = []
    assert await retried(call, policy(3, slept, built)) == "ok"
    assert (len(calls), built, slept) == (3, [1], [0.25, 0.25])  # a wait before each retry, as tenacity waits


async def test_the_policy_stops_at_its_attempt_limit_with_the_last_error() -> None:
    calls, call = script(Flaky("1"), Flaky("2"), Flaky("3"), "never")
    with pytest.raises(Flaky, match="3"):
        await retried(call, policy(3, [], []))
    assert len(calls) == 3


async def test_what_the_policy_does_not_retry_is_raised_after_one_call() -> None:
    calls, call = script(KeyError("not transient"), "never")
    with pytest.raises(KeyError):
        await retried(call, policy(3, [], []))
    assert len(calls) == 1


async def test_cancelling_the_first_attempt_cancels_without_building_a_retrying() -> None:
    calls, call = script(asyncio.CancelledError(), "never")
    built: list[int] = []
    with pytest.raises(asyncio.CancelledError):
        await retried(call, policy(3, [], built))
    assert (len(calls), built) == (1, [])


async def test_the_policy_is_built_once_the_first_attempt_is_over() -> None:
    """So a caller can take the first attempt's time off a time limit (Worker._store_call)."""
    order: list[str] = []
    calls, call = script(Flaky("1"), "ok")

    async def recorded() -> object:
        order.append("call")
        return await call()

    build = policy(2, [], [])

    def recorded_build() -> AsyncRetrying:
        order.append("build")
        return build()

    assert await retried(recorded, recorded_build) == "ok"
    assert order == ["call", "build", "call"]
