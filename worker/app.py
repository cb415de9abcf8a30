"""Assembles the worker for the configured transport and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from worker.config import Settings
from worker.pipeline import Worker
from worker.provider import ReplicateClient
from worker.store import PostgresStore, PostgrestStore, RunStore
from worker.wakeups import ListenWakeups, RealtimeWakeups

log = logging.getLogger("worker.app")


@dataclass
class Transport:
    store: RunStore
    wakeups: ListenWakeups | RealtimeWakeups


async def open_transport(settings: Settings, database_url: str | None = None) -> Transport:
    if settings.transport == "supabase":
        from supabase import AsyncClientOptions, acreate_client

        assert settings.supabase_url and settings.supabase_service_role_key
        key = settings.supabase_service_role_key.get_secret_value()
        client = await acreate_client(settings.supabase_url, key,
                                      options=AsyncClientOptions(auto_refresh_token=False, persist_session=False))
        return Transport(PostgrestStore(client), RealtimeWakeups(settings.supabase_url, key))
    url = database_url or (settings.database_url.get_secret_value() if settings.database_url else None)
    if url is None:
        raise ValueError("the postgres transport needs DATABASE_URL (or the embedded local database)")
    store = await PostgresStore.connect(url, max_size=min(20, settings.worker_concurrency + 2))
    return Transport(store, ListenWakeups(url))


@contextlib.asynccontextmanager
async def replicate_http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=settings.worker_concurrency + 8,
                          max_keepalive_connections=settings.worker_concurrency + 8)
    async with httpx.AsyncClient(limits=limits, timeout=settings.replicate_timeout_seconds) as http:
        yield http


async def serve(settings: Settings, database_url: str | None = None) -> Worker:
    """Run the worker until a signal arrives; returns it (with its counters) after the drain."""
    transport = await open_transport(settings, database_url)
    try:
        async with replicate_http(settings) as http:
            worker = Worker(settings, transport.store, ReplicateClient(http, settings), transport.wakeups)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, worker.stop)
            try:
                await worker.run()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            return worker
    finally:
        await transport.store.close()
