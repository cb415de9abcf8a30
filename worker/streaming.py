"""Live reply text for the thread's clients while the model writes, without a database row per
token. The final reply is still written once, by complete_run.

- supabase transport: Realtime Broadcast through its REST API (`POST /realtime/v1/api/broadcast`)
  to the private topic `thread:<thread id>`; clients join it with `private: true`, and RLS on
  realtime.messages (migration 20261122000500) lets only the thread's owner in.
- postgres transport: `NOTIFY assistant_stream` (for the `chat` client and trusted local
  listeners: LISTEN is not access-controlled in PostgreSQL).

Each message is a delta: {"run_id", "message_id" (the user message), "seq", "delta", "done"};
publishing is throttled to one message per reply per STREAM_PUBLISH_INTERVAL_MS, and to
STREAM_MAX_MESSAGES_PER_SECOND per worker in all (StreamBudget), which also writes a reply whole
when streaming it would leave the streams open more than STREAM_MAX_INTERVAL_MS apart. The deltas of all
replies in flight travel together: one NOTIFY statement or one Broadcast request carries every
delta that became due while the previous one was on its way (hundreds of replies streaming at
once would otherwise cost a round trip each). A failure to publish never fails the reply."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Protocol

import httpx

from worker.batching import Batcher
from worker.prompts import visible_text
from worker.store import storable

log = logging.getLogger("worker.streaming")

NOTIFY_CHANNEL = "assistant_stream"
BROADCAST_EVENT = "reply_delta"
MAX_DELTA_CHARS = 2000  # NOTIFY payloads stay far below PostgreSQL's 8000 bytes
MAX_BATCH = 200  # deltas per NOTIFY statement or Broadcast request


class Publisher(Protocol):
    async def publish(self, thread_id: uuid.UUID, payload: dict[str, Any]) -> None: ...


class NotifyPublisher:
    def __init__(self, pool: Any) -> None:
        self.pool = pool  # psycopg_pool.AsyncConnectionPool
        self._batcher: Batcher[str, None] = Batcher(self._send, MAX_BATCH)

    async def publish(self, thread_id: uuid.UUID, payload: dict[str, Any]) -> None:
        await self._batcher.submit(json.dumps({"thread_id": str(thread_id), **payload}))

    async def _send(self, payloads: list[str]) -> None:
        # One statement, notifications in array order (PostgreSQL delivers a transaction's
        # notifications in the order they were sent). The array goes in binary (%b): psycopg's
        # text form quotes and escapes each JSON payload with a regular expression, about 80
        # times slower.
        async with self.pool.connection() as conn:
            await conn.execute("select pg_notify(%s, p) from unnest(%b::text[]) with ordinality u(p, n) order by n",
                               (NOTIFY_CHANNEL, payloads))


class BroadcastPublisher:
    """Realtime's REST broadcast takes a list of messages: one request carries every due delta."""

    def __init__(self, http: httpx.AsyncClient, supabase_url: str, service_role_key: str) -> None:
        self.http = http
        self.url = f"{supabase_url.rstrip('/')}/realtime/v1/api/broadcast"
        self.headers = {"apikey": service_role_key, "Authorization": f"Bearer {service_role_key}"}
        self._batcher: Batcher[dict[str, Any], None] = Batcher(self._send, MAX_BATCH)

    async def publish(self, thread_id: uuid.UUID, payload: dict[str, Any]) -> None:
        await self._batcher.submit({"topic": f"thread:{thread_id}", "event": BROADCAST_EVENT, "payload": payload,
                                    "private": True})

    async def _send(self, messages: list[dict[str, Any]]) -> None:
        response = await self.http.post(self.url, json={"messages": messages}, headers=self.headers, timeout=5.0)
        if response.status_code >= 300:
            raise RuntimeError(f"broadcast refused: HTTP {response.status_code}")


class StreamBudget:
    """The stream messages one worker may publish per second, shared by its replies. While more
    replies stream than the budget allows at STREAM_PUBLISH_INTERVAL_MS, each publishes less
    often: its interval stretches to (replies streaming) / (messages per second). Supabase
    Realtime counts every Broadcast message against the project's quota (100 a second on the
    Free plan, 500 on Pro) and may suspend a project far beyond it. 0: no budget. It paces the
    deltas in between: a reply's first and closing deltas go at once, so the rate can pass it
    briefly when many replies start or end together.

    A reply streams only while the budget can still give every open stream a delta at least
    every STREAM_MAX_INTERVAL_MS (`admit`): past that, a new reply is written whole, without an
    event stream at Replicate, and its clients get it as the reply row. Streams that would publish
    a delta every few seconds, for replies that take a few seconds, show nothing a whole reply
    does not, and reading every token of them costs the worker (and Replicate's side) most of what
    a streamed reply costs beyond a whole one."""

    def __init__(self, per_second: float, max_interval: float = 0.0) -> None:
        self.per_second = per_second
        self.max_interval = max_interval  # 0: every reply streams, however rarely it publishes
        self.streaming = 0  # replies that have streamed text and not yet closed their stream
        self.open = 0  # streams admitted and not yet closed (text or not)

    def interval(self, base: float) -> float:
        return max(base, self.streaming / self.per_second) if self.per_second else base

    def admit(self) -> bool:
        """Whether a new reply may stream; if so, it holds a share until its relay closes."""
        if self.per_second and self.max_interval and (self.open + 1) / self.per_second > self.max_interval:
            return False
        self.open += 1
        return True


class ReplyRelay:
    """Turns the growing text of one reply into throttled deltas."""

    def __init__(self, publisher: Publisher, thread_id: uuid.UUID, run_id: uuid.UUID, message_id: uuid.UUID,
                 interval_seconds: float, budget: StreamBudget | None = None) -> None:
        self.publisher = publisher
        self.thread_id = thread_id
        self.base = {"run_id": str(run_id), "message_id": str(message_id)}
        self.interval = interval_seconds
        self.budget = budget
        self.counted = False  # in budget.streaming
        self.admitted = False  # holds a share of budget.open (see open)
        self.closed = False  # the closing delta was sent (or tried): later text is not streamed
        self.raw = ""
        self.text = ""
        self.sent = 0
        self.seq = 0
        self.last_publish = 0.0
        self.failed = False

    @classmethod
    def open(cls, publisher: Publisher, thread_id: uuid.UUID, run_id: uuid.UUID, message_id: uuid.UUID,
             interval_seconds: float, budget: StreamBudget) -> ReplyRelay | None:
        """A relay for a reply the budget lets stream, or None: the reply is written whole."""
        if not budget.admit():
            return None
        relay = cls(publisher, thread_id, run_id, message_id, interval_seconds, budget)
        relay.admitted = True
        return relay

    async def update(self, text: str) -> None:
        if self.closed:  # a reader that outlived its stream's end: never counted again
            return
        self.raw = text  # cheap per token; what is visible is worked out when a delta is due
        interval = self.interval
        if self.budget is not None:
            if not self.counted:
                self.budget.streaming += 1
                self.counted = True
            interval = self.budget.interval(interval)
        if time.monotonic() - self.last_publish >= interval:
            await self.flush()

    async def flush(self, done: bool = False) -> None:
        try:
            await self._flush(done)
        finally:
            if done:
                self.closed = True
                if self.counted:  # the stream is closed (or could not be): its share is free
                    self.budget.streaming -= 1  # type: ignore[union-attr]
                    self.counted = False
                if self.admitted:
                    self.budget.open -= 1  # type: ignore[union-attr]
                    self.admitted = False

    async def _flush(self, done: bool) -> None:
        if self.failed:
            return
        self.text = visible_text(storable(self.raw))  # as the reply will be stored: cleaned, then cut
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
