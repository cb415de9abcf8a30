"""Prometheus metrics and health endpoints on METRICS_HOST:METRICS_PORT.

  /metrics  Prometheus text format
  /healthz  200 while the process runs its loop
  /readyz   200 only when the database answers and the wake-up source is live (the LISTEN
            connection, or the Realtime subscription on the supabase transport); 503 otherwise,
            with the reason
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               ProcessCollector, generate_latest)

log = logging.getLogger("worker.observability")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    """One registry per worker (tests run several workers in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The process's own: resident memory, CPU, open descriptors; the garbage collector's runs
        # per generation (worker/gctune.py) and what they found.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.claimed = Counter("assistant_runs_claimed", "Runs claimed by this worker", registry=r)
        self.completed = Counter("assistant_runs_completed", "Runs completed with a reply", ["model"], registry=r)
        self.failed = Counter("assistant_run_attempts_failed", "Attempts that failed, by error code",
                              ["error_code"], registry=r)
        self.runs_failed = Counter("assistant_runs_failed", "Runs that ended failed (no attempt left, or not "
                                   "retryable), by the last error code", ["error_code"], registry=r)
        self.cancelled = Counter("assistant_runs_cancelled", "Runs cancelled by their user while in flight", registry=r)
        self.blocked = Counter("assistant_runs_blocked", "Runs refused at admission, by reason", ["error_code"], registry=r)
        self.released = Counter("assistant_runs_released", "Runs given back at shutdown", registry=r)
        self.abandoned = Counter("assistant_attempts_abandoned", "Attempts stopped because their lease was lost",
                                 registry=r)
        self.lost_creates = Counter("assistant_lost_creates", "Creates whose answer was lost, by whether their "
                                    "prediction was found", ["outcome"], registry=r)
        self.in_flight = Gauge("assistant_runs_in_flight", "Runs this worker is working on", registry=r)
        self.queue_depth = Gauge("assistant_queue_due", "Runs due now and not claimed (all workers)", registry=r)
        self.queue_in_progress = Gauge("assistant_queue_in_progress", "Runs in progress (all workers)", registry=r)
        self.provider_latency = Histogram("assistant_provider_latency_seconds", "Replicate prediction time, create to end",
                                          ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("assistant_time_to_first_token_seconds", "Time to the first output token",
                                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.reply_streams = Counter("assistant_reply_streams", "Predictions started with STREAM_REPLIES on, by "
                                     "whether the reply streamed or was written whole (the stream budget was full)",
                                     ["outcome"], registry=r)
        self.cost = Counter("assistant_cost_usd", "Estimated model cost", ["model"], registry=r)
        self.store_errors = Counter("assistant_store_errors", "Failed calls to the database or PostgREST", registry=r)
        self.wakeups_live = Gauge("assistant_wakeups_live", "1 while LISTEN or the Realtime subscription is live",
                                  registry=r)
        self.actions = Counter("assistant_actions_executed", "Action requests run, by outcome", ["status"], registry=r)


class HealthServer:
    def __init__(self, metrics: Metrics, ready: Callable[[], Awaitable[str | None]]) -> None:
        self.metrics = metrics
        self.ready = ready  # returns None when ready, else the reason
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("metrics listening", extra={"event": "metrics.listening", "host": host, "port": self.port})

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        try:
            reason = await asyncio.wait_for(self.ready(), timeout=2)
        except Exception as exc:  # a check that hangs or fails is a "not ready"
            reason = f"readiness check failed: {type(exc).__name__}"
        if reason:
            return web.json_response({"status": "not ready", "reason": reason}, status=503)
        return web.json_response({"status": "ready"})
