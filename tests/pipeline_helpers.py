"""Helpers for end-to-end tests: a user writing through RLS, a running worker, waiting for state."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from worker import chat
from worker.app import replicate_http
from worker.config import Settings
from worker.pipeline import Worker
from worker.provider import ReplicateClient
from worker.store import PostgresStore, RunStore
from worker.streaming import NotifyPublisher
from worker.wakeups import ListenWakeups


def worker_settings(base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "replicate_api_token": "r8_test", "replicate_base_url": base_url, "worker_transport": "postgres",
        "worker_sweep_interval_seconds": 3600, "worker_retry_base_seconds": 0.05, "worker_lease_seconds": 30,
        "worker_shutdown_grace_seconds": 5, "replicate_max_retry_after_seconds": 1,
        "replicate_max_creates_per_minute": 0,
        # The simulator's bag-of-words embeddings score a relevant chunk at 0.25-0.65 (an unrelated
        # one near 0); real sentence embeddings sit higher, hence the default of 0.5.
        "knowledge_match_threshold": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


async def as_user(db_url: str, user_id: uuid.UUID, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
    """One PostgREST-style request as a signed-in user."""
    async with await psycopg.AsyncConnection.connect(db_url, row_factory=dict_row, autocommit=True) as conn:
        return await chat.as_user(conn, user_id, sql, params)


async def new_user_thread(db_url: str, plan: str | None = "unlimited") -> tuple[uuid.UUID, uuid.UUID]:
    """A signed-up user (on `plan`; None: the plan sign-up gives) and a thread of theirs."""
    user_id = uuid.uuid4()
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("insert into auth.users (id, email) values (%s, %s)", (user_id, f"{user_id}@example.com"))
        if plan is not None:
            await conn.execute("update user_ai_settings set plan_id = %s where user_id = %s", (plan, user_id))
    [row] = await as_user(db_url, user_id, "insert into assistant_threads (title) values ('t') returning id")
    return user_id, row["id"]


async def say(db_url: str, user_id: uuid.UUID, thread_id: uuid.UUID, content: str,
              image_url: str | None = None) -> uuid.UUID:
    [row] = await as_user(db_url, user_id,
                          "insert into assistant_messages (thread_id, role, content, image_url) values (%s, 'user', %s, %s) returning id",
                          (thread_id, content, image_url))
    return row["id"]


async def query(db_url: str, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(db_url, row_factory=dict_row, autocommit=True) as conn:
        return await (await conn.execute(sql, params)).fetchall()


async def wait_until(check: Callable[[], Awaitable[Any]], timeout: float = 15.0, what: str = "condition") -> Any:
    """Polls `check` until it returns something truthy; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def checking(predicate: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    """wait_until's check for a plain condition (on the simulator's or an emulator's state, say)."""
    async def check() -> Any:
        return predicate()
    return check


async def finished_runs(db_url: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]] | None:
        rows = await query(db_url, "select * from assistant_runs where status not in ('queued', 'in_progress')")
        return rows if len(rows) >= count else None

    return await wait_until(check, timeout, f"{count} finished runs")


class NoWakeups:
    """A wake-up source that never fires (only the sweep finds work)."""

    live = True

    async def run(self, wake: Callable[[], None]) -> None:
        await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, db_url: str, *, wakeups: Any = None,
                         store: RunStore | None = None, stream: bool = False) -> AsyncIterator[Worker]:
    """A worker on the postgres transport; with `stream`, it streams replies over NOTIFY."""
    own_store = store is None
    store = store or await PostgresStore.connect(db_url)
    async with replicate_http(settings) as http:  # the worker's own HTTP engine, as deployed
        publisher = NotifyPublisher(store.pool) if stream and isinstance(store, PostgresStore) else None
        worker = Worker(settings, store, ReplicateClient(http, settings), wakeups or ListenWakeups(db_url),
                        publisher=publisher)
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.stop()
            await asyncio.wait_for(task, timeout=30)
            if own_store:
                await store.close()
