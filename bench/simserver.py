"""The Replicate simulator in a process of its own (so that it does not share the worker's CPU
loop), counting predictions in flight: `python -m bench.simserver --latency 2`.

Prints one JSON line {"base_url", "stats_url"} once listening. The stats server (another
loopback port) answers GET /stats and POST /reset. Predictions in flight = predictions created
and not yet ended (the model is "running" them: created <= now < created + latency), whatever
way the worker follows them (Prefer: wait, the SSE stream, polling); also counted: HTTP requests
open at the simulator (a held create or an open stream)."""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import time
from typing import Any

from aiohttp import web

from worker.__main__ import loop_factory
from worker.gctune import tune_gc
from worker.simulator import ReplicateSimulator


class CountingSimulator(ReplicateSimulator):
    open_requests = 0
    peak_open_requests = 0
    total_creates = 0
    peak_running = 0

    @property
    def running(self) -> int:
        """Predictions created and not yet ended (end times in a heap: O(log n) per create)."""
        ends: list[float] = self.__dict__.setdefault("_ends", [])
        now = time.time()
        while ends and ends[0] <= now:
            heapq.heappop(ends)
        return len(ends)

    async def _counted(self, call: Any) -> web.StreamResponse:
        self.open_requests += 1
        self.peak_open_requests = max(self.peak_open_requests, self.open_requests)
        try:
            return await call
        finally:
            self.open_requests -= 1

    async def _create(self, request: web.Request, model: str | None, extra: Any) -> web.StreamResponse:
        self.total_creates += 1
        heapq.heappush(self.__dict__.setdefault("_ends", []), time.time() + self.latency)
        self.peak_running = max(self.peak_running, self.running)
        return await self._counted(super()._create(request, model, extra))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(super()._stream(request))  # type: ignore[misc]

    async def _get(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(super()._get(request))

    def prune(self, keep_seconds: float = 60.0) -> None:
        """The simulator keeps every request and prediction (tests read them); a benchmark
        would only grow it, so forget what the worker can no longer ask about."""
        self.requests.clear()
        cutoff = time.time() - keep_seconds
        for key in [k for k, p in self.predictions.items() if p.created + p.latency < cutoff]:
            del self.predictions[key]


async def main(latency: float, port: int) -> None:
    sim = CountingSimulator(latency=latency)
    base_url = await sim.start(port=port)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"running": sim.running, "peak_running": sim.peak_running,
                                  "open_requests": sim.open_requests, "peak_open_requests": sim.peak_open_requests,
                                  "total_creates": sim.total_creates, "stored_predictions": len(sim.predictions)})

    async def reset(_: web.Request) -> web.Response:
        sim.peak_running = sim.running
        sim.peak_open_requests = sim.open_requests
        sim.total_creates = 0
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stats_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    # Tuned like the worker's own collector: untuned, it took 10% of the simulator's CPU at 1,000
    # streamed conversations, CPU the system under test shares.
    tune_gc()
    print(json.dumps({"base_url": base_url, "stats_url": f"http://127.0.0.1:{stats_port}"}), flush=True)
    while True:
        await asyncio.sleep(5)
        sim.prune()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--event-loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    # On uvloop like the worker: the simulator's CPU is the harness's, on the cores the system under test uses.
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        runner.run(main(args.latency, args.port))
