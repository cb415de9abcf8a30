"""Assembles the worker for the configured transport and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from worker.attachments import ImageResolver, Signer, supabase_signer
from worker.config import Settings
from worker.observability import HealthServer
from worker.pipeline import Worker
from worker.provider import ReplicateClient
from worker.store import PostgresStore, PostgrestStore, RunStore
from worker.streaming import BroadcastPublisher, NotifyPublisher, Publisher
from worker.wakeups import ListenWakeups, RealtimeWakeups

log = logging.getLogger("worker.app")


@dataclass
class Transport:
    store: RunStore
    wakeups: ListenWakeups | RealtimeWakeups
    signer: Signer | None = None  # Supabase Storage, where SUPABASE_URL and the key are set


async def supabase_client(settings: Settings) -> Any:
    from supabase import AsyncClientOptions, acreate_client

    assert settings.supabase_url and settings.supabase_service_role_key
    return await acreate_client(settings.supabase_url, settings.supabase_service_role_key.get_secret_value(),
                                options=AsyncClientOptions(auto_refresh_token=False, persist_session=False))


async def open_transport(settings: Settings, database_url: str | None = None, open_timeout: float = 30.0) -> Transport:
    client = await supabase_client(settings) if settings.supabase_url and settings.supabase_service_role_key else None
    signer = supabase_signer(client) if client is not None else None
    if settings.transport == "supabase":
        assert settings.supabase_url and settings.supabase_service_role_key
        key = settings.supabase_service_role_key.get_secret_value()
        return Transport(PostgrestStore(client), RealtimeWakeups(settings.supabase_url, key), signer)
    url = database_url or (settings.database_url.get_secret_value() if settings.database_url else None)
    if url is None:
        raise ValueError("the postgres transport needs DATABASE_URL (or the embedded local database)")
    store = await PostgresStore.connect(url, max_size=min(20, settings.worker_concurrency + 2), open_timeout=open_timeout,
                                        statement_timeout=settings.database_statement_timeout_seconds)
    return Transport(store, ListenWakeups(url), signer)


@contextlib.asynccontextmanager
async def replicate_http(settings: Settings) -> AsyncIterator[aiohttp.ClientSession]:
    """The session the Replicate client runs on: aiohttp directly (its connection pool holds a
    connection per prediction in flight), no cookies. Timeouts and redirects are the client's,
    set on each request."""
    connector = aiohttp.TCPConnector(limit=settings.worker_concurrency + 8, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


@contextlib.asynccontextmanager
async def web_http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The client for everything else over HTTP (image checks, Realtime broadcasts): httpx's
    interface on aiohttp's connection pool (httpx-aiohttp)."""
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(transport=AiohttpTransport(limits=limits),
                                 timeout=settings.replicate_timeout_seconds) as http:
        yield http


def publisher_for(settings: Settings, transport: Transport, http: httpx.AsyncClient) -> Publisher | None:
    """Realtime Broadcast where Supabase is configured, else NOTIFY on a direct connection."""
    if settings.supabase_url and settings.supabase_service_role_key:
        return BroadcastPublisher(http, settings.supabase_url, settings.supabase_service_role_key.get_secret_value())
    if isinstance(transport.store, PostgresStore):
        return NotifyPublisher(transport.store.pool)
    return None


def build_worker(settings: Settings, transport: Transport, replicate: aiohttp.ClientSession,
                 web: httpx.AsyncClient) -> Worker:
    return Worker(settings, transport.store, ReplicateClient(replicate, settings), transport.wakeups,
                  images=ImageResolver(settings, transport.store, signer=transport.signer),
                  publisher=publisher_for(settings, transport, web))


@contextlib.asynccontextmanager
async def health_endpoint(settings: Settings, worker: Worker) -> AsyncIterator[HealthServer | None]:
    """/metrics, /healthz and /readyz on METRICS_HOST:METRICS_PORT while the worker runs, when
    METRICS_ENABLED; None when disabled or the port cannot be bound (the worker runs anyway)."""
    if not settings.metrics_enabled:
        yield None
        return
    health: HealthServer | None = HealthServer(worker.metrics, worker.not_ready_because)
    try:
        await health.start(settings.metrics_host, settings.metrics_port)
    except OSError as exc:  # e.g. a second worker on the same host and port
        log.error("metrics endpoint not started", extra={"event": "metrics.failed", "error": str(exc)})
        await health.stop()
        health = None
    try:
        yield health
    finally:
        if health:
            await health.stop()


async def serve(settings: Settings, database_url: str | None = None) -> Worker:
    """Run the worker until a signal arrives; returns it (with its counters) after the drain."""
    transport = await open_transport(settings, database_url)
    try:
        async with replicate_http(settings) as replicate, web_http(settings) as web:
            worker = build_worker(settings, transport, replicate, web)
            async with health_endpoint(settings, worker):
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
