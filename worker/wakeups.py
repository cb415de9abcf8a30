"""Wake-up hints for the worker. A hint only says "look now": the database is the truth, so a lost
hint costs at most one sweep interval, and every (re)connect is followed by a sweep.

- `ListenWakeups`: LISTEN assistant_runs on a direct connection (postgres transport).
- `RealtimeWakeups`: a Supabase Realtime `postgres_changes` INSERT subscription on
  assistant_messages (role=eq.user) and UPDATE subscription on assistant_action_requests
  (status=eq.approved). realtime-py reconnects by itself a few times and then gives up without a
  word, and a channel the server closes is never rejoined; so this class supervises the client and
  rebuilds it whenever it is not connected and subscribed. When the server says subscribing to
  the database's changes failed (a `system` message with status "error": the channel stays
  joined, but no change will come), the client is rebuilt at once, with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from websockets.protocol import State

log = logging.getLogger("worker.wakeups")

Wake = Callable[..., None]  # wake(kind="runs"|"actions")


class ListenWakeups:
    def __init__(self, url: str, *, health_check_seconds: float = 10.0, max_backoff: float = 5.0) -> None:
        self.url = url
        self.health_check_seconds = health_check_seconds
        self.max_backoff = max_backoff
        self.live = False

    async def run(self, wake: Wake) -> None:
        backoff = 0.2
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute("listen assistant_runs")
                    await conn.execute("listen assistant_actions")
                    await conn.execute("listen assistant_cancel")
                    self.live, backoff = True, 0.2
                    log.info("listening", extra={"event": "wakeups.live", "transport": "postgres"})
                    wake("actions")  # sweep: whatever arrived while we were not listening
                    while True:
                        async for notify in conn.notifies(timeout=self.health_check_seconds):
                            wake({"assistant_actions": "actions", "assistant_cancel": "cancel"}.get(notify.channel, "runs"))
                        await conn.execute("select 1")  # a silent dead connection shows up here
            except (psycopg.OperationalError, OSError) as exc:
                if self.live:
                    log.warning("listen connection lost", extra={"event": "wakeups.lost", "error": str(exc)[:200]})
            finally:
                self.live = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)


class RealtimeWakeups:
    """Subscribes through supabase-py's realtime client (the Phoenix protocol of Supabase Realtime)."""

    TOPIC = "assistant-worker"

    def __init__(self, supabase_url: str, service_role_key: str, *, check_seconds: float = 1.0,
                 unhealthy_grace_seconds: float = 20.0, max_backoff: float = 10.0,
                 ping_interval_seconds: float | None = 5.0, ping_timeout_seconds: float = 5.0,
                 realtime_options: dict[str, Any] | None = None) -> None:
        self.realtime_url = f"{supabase_url.rstrip('/')}/realtime/v1"
        self.key = service_role_key
        self.check_seconds = check_seconds
        self.unhealthy_grace_seconds = unhealthy_grace_seconds
        self.max_backoff = max_backoff
        self.realtime_options = realtime_options or {}
        # A connection that goes silent without closing (half-open: a NAT or a load balancer
        # forgot it) brings no error. websockets' own keepalive, which realtime-py keeps at its
        # defaults, takes up to 20 s + 20 s + a 10 s closing handshake to give it up; this ping
        # finds it within about interval + timeout and cuts it, and it is then reconnected as a
        # dropped connection is.
        self.ping_interval_seconds = ping_interval_seconds
        self.ping_timeout_seconds = ping_timeout_seconds
        self.silent_connections = 0
        self.live = False
        self.rebuilds = 0
        self.subscription_errors = 0  # the server's "could not subscribe to changes" messages

    async def run(self, wake: Wake) -> None:
        backoff = 0.5
        while True:
            try:
                if await self._session(wake):
                    backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection refused, handshake failed, protocol error
                log.warning("realtime connection failed", extra={"event": "wakeups.lost", "error": str(exc)[:200]})
            self.rebuilds += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _session(self, wake: Wake) -> bool:
        """One client and channel, until they must be rebuilt. True if changes had been flowing
        (the server confirmed the subscription) for at least `unhealthy_grace_seconds`: only then
        does the next rebuild come without its delay growing, so that a subscription the server
        keeps refusing, or confirms and then drops again and again, is retried with backoff."""
        from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

        client = AsyncRealtimeClient(self.realtime_url, token=self.key, **self.realtime_options)
        ended = asyncio.Event()
        confirmed_at: float | None = None

        def on_insert(payload: Any) -> None:
            wake()

        def on_approval(payload: Any) -> None:
            wake("actions")

        def subscription_failed(message: str) -> None:
            self.live = False
            self.subscription_errors += 1
            log.warning("realtime subscription to database changes failed",
                        extra={"event": "wakeups.subscription_failed", "error": message[:300]})
            ended.set()

        def on_system(payload: Any) -> None:
            # The join reply only means the channel exists; changes flow once the server says
            # "Subscribed to PostgreSQL". Anything committed before that is found by the sweep.
            nonlocal confirmed_at
            if getattr(payload, "extension", None) != "postgres_changes":
                return
            if getattr(payload, "status", None) == "ok":
                if not self.live:
                    log.info("subscribed", extra={"event": "wakeups.live", "transport": "supabase"})
                self.live = True
                confirmed_at = confirmed_at or time.monotonic()
                wake("actions")
            else:  # realtime-py versions that pass errors to system callbacks
                subscription_failed(str(getattr(payload, "message", payload)))

        def on_state(state: Any, error: Exception | None) -> None:
            if state != RealtimeSubscribeStates.SUBSCRIBED:
                self.live = False
                log.warning("realtime channel %s", state, extra={"event": "wakeups.channel_state",
                                                                 "state": str(state), "error": str(error)[:200]})
            if state == RealtimeSubscribeStates.CLOSED:
                ended.set()
            # realtime-py reports the server's error system message as a channel error (the payload
            # as JSON) and rejoins on the same socket after a second, and again a second after
            # every failure, without end. A lost socket is a channel error too, but then the
            # client is not connected and its own reconnection is left to run.
            elif state == RealtimeSubscribeStates.CHANNEL_ERROR and client.is_connected:
                failure = postgres_changes_error(error)
                if failure is not None:
                    subscription_failed(failure)

        try:
            channel = client.channel(self.TOPIC)
            channel.on_postgres_changes("INSERT", on_insert, table="assistant_messages", schema="public",
                                        filter="role=eq.user")
            channel.on_postgres_changes("UPDATE", on_approval, table="assistant_action_requests", schema="public",
                                        filter="status=eq.approved")
            channel.on_system(on_system)
            await channel.subscribe(on_state)
            await self._watch(client, channel, ended)
            return confirmed_at is not None and time.monotonic() - confirmed_at >= self.unhealthy_grace_seconds
        finally:
            self.live = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), timeout=2)

    async def _watch(self, client: Any, channel: Any, ended: asyncio.Event) -> None:
        """Returns when the client must be rebuilt: the channel was closed by the server, its
        subscription to changes failed, or the client has been disconnected or unsubscribed for
        longer than its own retries need."""
        unhealthy_for = 0.0
        pinger = _Pinger(self.ping_interval_seconds, self.ping_timeout_seconds)
        while not ended.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ended.wait(), timeout=self.check_seconds)
            if await pinger.silent(getattr(client, "_ws_connection", None)):
                self.silent_connections += 1
                self.live = False
                log.warning("realtime connection silent; cutting it", extra={
                    "event": "wakeups.silent", "ping_timeout_seconds": self.ping_timeout_seconds})
            healthy = client.is_connected and channel.is_joined and self.live
            listen_task = getattr(client, "_listen_task", None)
            if listen_task is not None and listen_task.done():
                return  # realtime-py gave up reconnecting
            unhealthy_for = 0.0 if healthy else unhealthy_for + self.check_seconds
            if unhealthy_for >= self.unhealthy_grace_seconds:
                return


class _Pinger:
    """WebSocket pings on the client's current connection: one every `interval` seconds, the
    next only once its pong came. `silent` cuts a connection whose pong is over `timeout` late
    (the transport aborted: websockets then reports it closed abnormally, as if dropped)."""

    def __init__(self, interval: float | None, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.connection: Any = None
        self.pong: asyncio.Future[float] | None = None
        self.sent_at = 0.0
        self.answered_at = time.monotonic()

    async def silent(self, connection: Any) -> bool:
        if self.interval is None or connection is None:
            return False
        now = time.monotonic()
        if connection is not self.connection:  # a new connection: start afresh
            self._forget()
            self.connection, self.answered_at = connection, now
        if self.pong is not None:
            if self.pong.done():
                self._forget()
                self.answered_at = now
            elif now - self.sent_at >= self.timeout:
                self._cut(connection)
                return True
        elif now - self.answered_at >= self.interval and getattr(connection, "state", None) is State.OPEN:
            try:
                # Bounded: sending waits while the connection closes or its writes are paused.
                self.pong = await asyncio.wait_for(connection.ping(), self.timeout)
                self.sent_at = now
            except TimeoutError:
                self._cut(connection)
                return True
            except Exception:  # closed meanwhile: realtime-py reconnects
                self.pong = None
        return False

    def _cut(self, connection: Any) -> None:
        self._forget()
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.abort()

    def _forget(self) -> None:
        if self.pong is not None:
            if self.pong.done() and not self.pong.cancelled():
                self.pong.exception()  # retrieved: a closed connection fails its pong waiters
            else:
                self.pong.cancel()
        self.pong = None


def postgres_changes_error(error: BaseException | None) -> str | None:
    """The message of a Realtime `system` error from the postgres_changes extension, if `error`
    (a channel error from realtime-py) is one; None for any other channel error."""
    try:
        payload = json.loads(str(error))
    except ValueError:
        return None
    if isinstance(payload, dict) and payload.get("extension") == "postgres_changes" and payload.get("status") == "error":
        return str(payload.get("message", ""))
    return None
