"""Live reply text for the thread's clients while the model writes, without a database row per
token. The final reply is still written once, by complete_run.

- supabase transport: Realtime Broadcast through its REST API (`POST /realtime/v1/api/broadcast`)
  to the private topic `thread:<thread id>`; clients join it with `private: true`, and RLS on
  realtime.messages (migration 20261122000500) lets only the thread's owner in.
- postgres transport: `NOTIFY assistant_stream` (for the `chat` client and trusted local
  listeners: LISTEN is not access-controlled in PostgreSQL).

Each message is a delta: {"run_id", "message_id" (the user message), "seq", "delta", "done"};
publishing is throttled to one message per reply per STREAM_PUBLISH_INTERVAL_MS. The deltas of all
replies in flight travel together: one NOTIFY statement or one Broadcast request carries every
delta that became due while the previous one was on its way (hundreds of replies streaming at
once would otherwise cost a round trip each). A failure to publish never fails the reply."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

import httpx

from worker.prompts import visible_text

log = logging.getLogger("worker.streaming")

NOTIFY_CHANNEL = "assistant_stream"
BROADCAST_EVENT = "reply_delta"
MAX_DELTA_CHARS = 2000  # NOTIFY payloads stay far below PostgreSQL's 8000 bytes
MAX_BATCH = 200  # deltas per NOTIFY statement or Broadcast request
T = TypeVar("T")


class Publisher(Protocol):
    async def publish(self, thread_id: uuid.UUID, payload: dict[str, Any]) -> None: ...


class Batcher(Generic[T]):
    """Group commit for small messages: `submit` queues an item and returns once the batch that
    carried it was sent (or raises what sending it raised). One batch is on its way at a time;
    whatever is submitted meanwhile goes in the next one, so an idle publisher adds no delay and
    a busy one sends one request per round trip instead of one per item. Items keep their order."""

    def __init__(self, send: Callable[[list[T]], Awaitable[None]], max_batch: int = MAX_BATCH) -> None:
        self._send = send
        self._max = max_batch
        self._queue: list[tuple[T, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._drain())
        await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:self._max], self._queue[self._max:]
            try:
                await self._send([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)


class NotifyPublisher:
    def __init__(self, pool: Any) -> None:
        self.pool = pool  # psycopg_pool.AsyncConnectionPool
        self._batcher: Batcher[str] = Batcher(self._send)

    async def publish(self, thread_id: uuid.UUID, payload: dict[str, Any]) -> None:
        await self._batcher.submit(json.dumps({"thread_id": str(thread_id), **payload}))

    async def _send(self, payloads: list[str]) -> None:
        # One statement, notifications in array order (PostgreSQL delivers a transaction's
        # notifications in the order they were sent).
        async with self.pool.connection() as conn:
            await conn.execute("select pg_notify(%s, p) from unnest(%s::text[]) with ordinality u(p, n) order by n",
                               (NOTIFY_CHANNEL, payloads))


class BroadcastPublisher:
    """Realtime's REST broadcast takes a list of messages: one request carries every due delta."""

    def __init__(self, http: httpx.AsyncClient, supabase_url: str, service_role_key: str) -> None:
        self.http = http
        self.url = f"{supabase_url.rstrip('/')}/realtime/v1/api/broadcast"
        self.headers = {"apikey": service_role_key, "Authorization": f"Bearer {service_role_key}"}
        self._batcher: Batcher[dict[str, Any]] = Batcher(self._send)

    async def publish(self, thread_id: uuid.UUID, payload: dict[str, Any]) -> None:
        await self._batcher.submit({"topic": f"thread:{thread_id}", "event": BROADCAST_EVENT, "payload": payload,
                                    "private": True})

    async def _send(self, messages: list[dict[str, Any]]) -> None:
        response = await self.http.post(self.url, json={"messages": messages}, headers=self.headers, timeout=5.0)
        if response.status_code >= 300:
            raise RuntimeError(f"broadcast refused: HTTP {response.status_code}")


class ReplyRelay:
    """Turns the growing text of one reply into throttled deltas."""

    def __init__(self, publisher: Publisher, thread_id: uuid.UUID, run_id: uuid.UUID, message_id: uuid.UUID,
                 interval_seconds: float) -> None:
        self.publisher = publisher
        self.thread_id = thread_id
        self.base = {"run_id": str(run_id), "message_id": str(message_id)}
        self.interval = interval_seconds
        self.raw = ""
        self.text = ""
        self.sent = 0
        self.seq = 0
        self.last_publish = 0.0
        self.failed = False

    async def update(self, text: str) -> None:
        self.raw = text  # cheap per token; what is visible is worked out when a delta is due
        if time.monotonic() - self.last_publish >= self.interval:
            await self.flush()

    async def flush(self, done: bool = False) -> None:
        if self.failed:
            return
        self.text = visible_text(self.raw)
        delta = self.text[self.sent:]
        if not delta and (not done or self.seq == 0):
            return  # nothing new; and a reply that never streamed needs no closing message
        try:
            chunks = [delta[i:i + MAX_DELTA_CHARS] for i in range(0, len(delta), MAX_DELTA_CHARS)] or [""]
            for index, chunk in enumerate(chunks):
                self.seq += 1
                await self.publisher.publish(self.thread_id, {**self.base, "seq": self.seq, "delta": chunk,
                                                              "done": done and index == len(chunks) - 1})
            self.sent = len(self.text)
            self.last_publish = time.monotonic()
        except Exception as exc:  # the live view is a nicety: the reply itself is not at stake
            self.failed = True
            log.warning("streaming to clients failed", extra={"event": "stream.publish_failed", "error": str(exc)[:200],
                                                              **self.base})
