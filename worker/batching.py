"""Group commit for small requests: many callers, one request per round trip."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# What a batch's sender returns: one outcome per item (a result, or the exception that item
# raises), or None when every item succeeded without a result of its own.
Outcomes = Sequence["R | BaseException"] | None


class Batcher(Generic[T, R]):
    """`submit` queues an item and returns its outcome once the batch that carried it was sent.
    One batch is on its way at a time; whatever is submitted meanwhile goes in the next one, so an
    idle batcher adds no delay and a busy one sends one request per round trip instead of one per
    item. Items keep their order. If sending raises, every item of that batch raises it. With
    `key`, a batch carries at most one item per key: another waits for the next batch."""

    def __init__(self, send: Callable[[list[T]], Awaitable[Outcomes[R]]], max_batch: int, *,
                 key: Callable[[T], Hashable] | None = None) -> None:
        self._send = send
        self._max = max_batch
        self._key = key
        self._queue: list[tuple[T, asyncio.Future[R | None]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R | None:
        future: asyncio.Future[R | None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._next_batch()
            try:
                outcomes = await self._send([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for index, (_, future) in enumerate(batch):
                if future.done():
                    continue
                outcome = outcomes[index] if outcomes is not None else None
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _next_batch(self) -> tuple[list[tuple[T, asyncio.Future[R | None]]], list[tuple[T, asyncio.Future[R | None]]]]:
        """The queue's first items up to the batch size (one per key), and the rest in order."""
        if self._key is None:
            return self._queue[:self._max], self._queue[self._max:]
        batch: list[tuple[T, asyncio.Future[R | None]]] = []
        rest: list[tuple[T, asyncio.Future[R | None]]] = []
        keys: set[Hashable] = set()
        for entry in self._queue:
            key = self._key(entry[0])
            if len(batch) < self._max and key not in keys:
                keys.add(key)
                batch.append(entry)
            else:
                rest.append(entry)
        return batch, rest
