"""Crashes and faults, each bounded in time: workers killed with SIGKILL mid-backlog, every kind of
Replicate failure, a database restart under a running worker. Plus the metrics and health
endpoints that show it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import PROJECT_DIR
from tests.pipeline_helpers import finished_runs, new_user_thread, query, running_worker, say, wait_until, worker_settings
from worker import migrations
from worker.localdb import LocalDatabase
from worker.observability import HealthServer
from worker.simulator import Fault, ReplicateSimulator


async def spawn_worker(db_url: str, simulator: ReplicateSimulator, name: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "DATABASE_URL": db_url, "WORKER_TRANSPORT": "postgres", "REPLICATE_API_TOKEN": "r8_test",
           "REPLICATE_BASE_URL": simulator.base_url, "WORKER_ID": name, "WORKER_LEASE_SECONDS": "10",
           "WORKER_CONCURRENCY": "8", "WORKER_SWEEP_INTERVAL_SECONDS": "1", "REPLICATE_MAX_CREATES_PER_MINUTE": "0",
           "METRICS_ENABLED": "false", "LOG_LEVEL": "WARNING", "USAGE_REPORT_REFRESH_SECONDS": "0"}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "worker", "run", cwd=PROJECT_DIR, env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def test_workers_killed_with_sigkill_lose_nothing_and_double_nothing(db_url, simulator) -> None:
    simulator.latency = 0.4
    users = [await new_user_thread(db_url, plan="free") for _ in range(4)]
    messages = []
    for i in range(5):  # 20 messages: within the free plan's 6 requests an hour per user
        for user, thread in users:
            messages.append(await say(db_url, user, thread, f"backlog {i}"))
    steady = await spawn_worker(db_url, simulator, "steady")
    victim = await spawn_worker(db_url, simulator, "victim-0")
    try:
        for round_ in range(1, 4):  # kill the second worker three times while it works
            await wait_until(lambda: query(db_url, "select 1 from assistant_runs where lease_owner like 'victim%%'"),
                             timeout=30, what="the victim to hold a run")
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            victim = await spawn_worker(db_url, simulator, f"victim-{round_}")
        runs = await finished_runs(db_url, len(messages), timeout=90)
    finally:
        for process in (steady, victim):
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert len(runs) == len(messages)
    replies = await query(db_url, "select reply_to, count(*) as n from assistant_messages where role = 'assistant' group by reply_to")
    assert {r["reply_to"] for r in replies} == set(messages) and {r["n"] for r in replies} == {1}
    assert await query(db_url, "select * from assistant_runs where status in ('queued', 'in_progress')") == []
    # Usage counted once per message: admission happens at the first claim only, and tokens once
    # per completed reply.
    for user, _ in users:
        [used] = await query(db_url, "select used from ai_usage_counters where user_id = %s and metric = 'messages'"
                                     " and time_window = 'day'", (user,))
        assert used["used"] == 5
        [tokens] = await query(db_url, "select used from ai_usage_counters where user_id = %s and metric = 'tokens'"
                                       " and time_window = 'day'", (user,))
        [expected] = await query(db_url, "select sum(e.input_tokens + e.output_tokens) as n from assistant_inference_events e"
                                         " where e.user_id = %s and e.status = 'succeeded'", (user,))
        assert tokens["used"] == expected["n"]
    succeeded = await query(db_url, "select message_id, count(*) as n from assistant_inference_events"
                                    " where status = 'succeeded' group by message_id")
    assert {r["n"] for r in succeeded} == {1}


FAULT_MIX = [
    Fault("http", status=429, retry_after=0.1), Fault("http", status=429), Fault("http", status=500),
    Fault("http", status=503), Fault("hang"), Fault("failed"), Fault("canceled"), Fault("malformed"),
    Fault("garbage"), Fault("http", status=502), Fault("hang"), Fault("failed"),
]


async def test_every_replicate_fault_ends_in_a_terminal_state_within_the_retry_budget(db_url, simulator) -> None:
    simulator.inject(*FAULT_MIX)
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, replicate_max_http_retries=1, replicate_timeout_seconds=0.5,
                               replicate_prefer_wait_seconds=1, worker_lease_seconds=10,
                               replicate_max_retry_after_seconds=0.5, worker_retry_base_seconds=0.05)
    messages = [await say(db_url, user, thread, f"m{i}") for i in range(12)]
    async with running_worker(settings, db_url):
        runs = await finished_runs(db_url, len(messages), timeout=60)
    assert {r["status"] for r in runs} <= {"completed", "failed"}
    assert all(r["lease_owner"] is None and r["lease_expires_at"] is None for r in runs)
    assert all(r["attempts"] <= r["max_attempts"] for r in runs)
    replies = await query(db_url, "select reply_to from assistant_messages where role = 'assistant'")
    assert sorted(str(r["reply_to"]) for r in replies) == sorted(str(m) for m in messages)
    codes = {r["error_code"] for r in await query(db_url, "select error_code from assistant_inference_events"
                                                          " where status = 'failed'")}
    assert simulator.faults == []  # every fault was served
    assert codes <= {"rate_limited", "provider_unavailable", "timeout", "model_failed", "invalid_output"}
    assert codes >= {"timeout", "model_failed", "invalid_output"}  # these are never absorbed by HTTP retries


@pytest.fixture
async def own_cluster(tmp_path: Path) -> AsyncIterator[tuple[LocalDatabase, str]]:
    """A database server of its own, to be restarted under a worker."""
    cluster = LocalDatabase(tmp_path / "restartable", fast=True)
    await asyncio.to_thread(cluster.start)
    url = cluster.url()
    await asyncio.to_thread(migrations.prepare, url, project_dir=PROJECT_DIR, seed=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into ai_plans (id, name) values ('unlimited', 'Unlimited (tests)')")
    yield cluster, url
    await asyncio.to_thread(cluster.destroy)


async def test_the_worker_recovers_from_a_database_restart_and_reports_it(own_cluster, simulator) -> None:
    cluster, url = own_cluster
    user, thread = await new_user_thread(url)
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.5)
    async with running_worker(settings, url) as worker, httpx.AsyncClient() as http:
        health = HealthServer(worker.metrics, worker.not_ready_because)
        await health.start("127.0.0.1", 0)
        base = f"http://127.0.0.1:{health.port}"
        try:
            await wait_until(lambda: ready(http, base), what="readiness")
            await say(url, user, thread, "before the restart")
            await finished_runs(url, 1)

            await asyncio.to_thread(cluster.stop)
            await wait_until(lambda: not_ready(http, base), what="readiness to drop")
            assert (await http.get(f"{base}/healthz")).status_code == 200  # alive, just not ready
            await asyncio.to_thread(cluster.start)

            await wait_until(lambda: ready(http, base), timeout=30, what="readiness after the restart")
            await say(url, user, thread, "after the restart")
            runs = await finished_runs(url, 2, timeout=30)
            metrics = (await http.get(f"{base}/metrics")).text
        finally:
            await health.stop()
    assert {r["status"] for r in runs} == {"completed"}
    assert 'assistant_runs_completed_total{model="meta/meta-llama-3-8b-instruct"} 2.0' in metrics
    assert "assistant_runs_claimed_total 2.0" in metrics
    assert "assistant_provider_latency_seconds_count" in metrics
    assert "assistant_wakeups_live 1.0" in metrics


async def ready(http: httpx.AsyncClient, base: str) -> bool:
    return (await http.get(f"{base}/readyz")).status_code == 200


async def not_ready(http: httpx.AsyncClient, base: str) -> bool:
    response = await http.get(f"{base}/readyz")
    return response.status_code == 503 and "database unavailable" in response.json()["reason"]


async def test_a_migration_changing_a_functions_result_type_under_a_running_worker_costs_no_call(db_url: str) -> None:
    # psycopg prepares a statement run five times; PostgreSQL then refuses the prepared call once the
    # function's result type changed ("cached plan must not change result type"), on that connection
    # until it closes. 20261123000100 changed claim_runs' so; the store prepares afresh and calls again.
    from worker.store import PostgresStore

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as admin:
        await admin.execute("create function public.probe() returns table (x jsonb) language sql as $$ select '[1]'::jsonb $$")
        await admin.execute("create function public.probe_unsupported() returns table (x int) language plpgsql as $$ begin "
                            "raise exception 'not supported here' using errcode = '0A000'; end $$")
        store = await PostgresStore.connect(db_url, max_size=1)
        try:
            for _ in range(6):
                assert await store.call("probe", {}, rows=True) == [{"x": [1]}]
            async with store.pool.connection() as c:
                prepared = await (await c.execute("select count(*) as n from pg_prepared_statements")).fetchone()
            assert prepared["n"] >= 1  # the call is prepared: the case this test is about
            await admin.execute("drop function public.probe(); "
                                "create function public.probe() returns table (x json) language sql as $$ select '[2]'::json $$")
            assert await store.call("probe", {}, rows=True) == [{"x": [2]}]
            assert await store.call("probe", {}, rows=True) == [{"x": [2]}]
            with pytest.raises(psycopg.errors.FeatureNotSupported):  # other refusals of the kind still fail
                await store.call("probe_unsupported", {}, rows=True)
        finally:
            await store.close()
