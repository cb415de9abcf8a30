"""/readyz on the supabase transport, served the way `python -m worker run` serves it (the worker's
health endpoint with METRICS_ENABLED, here on a free loopback port), against the Realtime and
PostgREST emulator."""

from __future__ import annotations


import httpx

from tests.pipeline_helpers import checking, wait_until
from tests.supabase_emulator import SupabaseEmulator
from tests.test_supabase_transport import quick_wakeups, start_worker, stop_worker, supabase_settings
from worker.app import health_endpoint


async def readyz_status(http: httpx.AsyncClient, status: int) -> httpx.Response | None:
    response = await http.get("/readyz")
    return response if response.status_code == status else None


async def test_readyz_is_503_with_the_reason_until_the_realtime_subscription_is_live(db_url, simulator) -> None:
    emulator = SupabaseEmulator(db_url)
    await emulator.start()
    # The channel will be joined, but subscribing to the database's changes is refused.
    await emulator.fail_postgres_changes()
    settings = supabase_settings(simulator, emulator, metrics_enabled=True, metrics_host="127.0.0.1", metrics_port=0)
    wakeups = quick_wakeups(emulator, max_backoff=1.0)
    worker, task, clients = await start_worker(settings, wakeups)
    try:
        async with health_endpoint(settings, worker) as health:
            assert health is not None and health.port
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{health.port}", timeout=5) as http:
                await wait_until(checking(lambda: wakeups.subscription_errors >= 1), what="the refusal")
                refused = await http.get("/readyz")
                assert refused.status_code == 503
                assert refused.json() == {"status": "not ready", "reason": "the wake-up subscription is not live"}
                assert (await http.get("/healthz")).status_code == 200  # alive, only not ready
                assert "assistant_wakeups_live 0.0" in (await http.get("/metrics")).text

                emulator.restore_postgres_changes()
                ready = await wait_until(lambda: readyz_status(http, 200), 15, "readiness")
                assert ready.json() == {"status": "ready"} and wakeups.live
                assert "assistant_wakeups_live 1.0" in (await http.get("/metrics")).text

                # PostgREST losing its database is a "not ready" too, with its own reason.
                emulator.cut_database()
                down = await http.get("/readyz")
                assert down.status_code == 503
                assert down.json() == {"status": "not ready", "reason": "database unavailable: StoreUnavailable"}
                emulator.restore_database()
                await wait_until(lambda: readyz_status(http, 200), 15, "readiness after the outage")
    finally:
        await stop_worker(worker, task, clients)
        await emulator.stop()
