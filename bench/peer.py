"""A peer on the same database in the same run: Procrastinate (PyPI; its schema in a schema of
its own) enqueuing and running no-op jobs, against our enqueue (a user message inserted as
PostgREST does, which queues a run by trigger) and claim-and-complete cycle (`claim_runs` →
no-op provider → `complete_run`, the real `worker.pipeline.Worker`), as jobs per second.

Both sides: N jobs enqueued one per request from the same number of concurrent connections,
then one worker with the same concurrency and a pool of at most 20 connections drains them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from bench.cluster import UNLIMITED_PLAN, BenchCluster
from worker.app import replicate_http
from worker.attachments import ImageResolver
from worker.config import Settings
from worker.pipeline import Worker
from worker.provider import Prediction, ReplicateClient
from worker.store import PostgresStore

POOL_MAX = 20  # the worker's own pool: min(20, WORKER_CONCURRENCY + 2)


class NoopProvider(ReplicateClient):
    """Answers at once, without HTTP: the cycle measured is the worker's and the database's."""

    async def predict(self, model: Any, model_input: dict[str, Any], token: str | None = None,
                      **_: Any) -> Prediction:  # on_text, handle …: nothing to stream or cancel
        return Prediction(id=f"noop-{uuid.uuid4().hex[:12]}", text="ok",
                          metrics={"input_token_count": 10, "output_token_count": 1, "predict_time": 0.0}, latency_ms=0)


class NoWakeups:
    live = True

    async def run(self, wake: Any) -> None:
        await asyncio.Event().wait()


async def _enqueue_parallel(count: int, connections: int, one: Any) -> float:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def lane() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(i)

    started = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(connections)))
    return time.monotonic() - started


async def ours(url: str, jobs: int, concurrency: int, connections: int) -> dict[str, Any]:
    conversations = 1000
    with psycopg.connect(url, autocommit=True) as conn:
        users = [r[0] for r in conn.execute("""
            insert into auth.users (id, aud, role, email)
            select gen_random_uuid(), 'authenticated', 'authenticated', 'peer' || g || '@bench.example'
              from generate_series(1, %s::int) g returning id""", (conversations,)).fetchall()]
        conn.execute("update user_ai_settings set plan_id = %s where user_id = any(%s)", (UNLIMITED_PLAN, users))
        threads = [r[0] for r in conn.execute(
            "insert into assistant_threads (user_id, title) select u, 'peer' from unnest(%s::uuid[]) u returning id",
            (users,)).fetchall()]
    owners = dict(zip(threads, users, strict=True))
    pool = AsyncConnectionPool(url, min_size=connections, max_size=connections, open=False,
                               kwargs={"autocommit": True, "application_name": "bench-peer-ours"})
    await pool.open(wait=True)

    async def enqueue(i: int) -> None:
        thread = threads[i % len(threads)]
        claims = json.dumps({"sub": str(owners[thread]), "role": "authenticated", "aud": "authenticated"})
        async with pool.connection() as conn:
            await conn.execute("begin; set local role authenticated; "
                               f"select set_config('request.jwt.claims', '{claims}', true); "
                               "insert into public.assistant_messages (thread_id, role, content) "
                               f"values ('{thread}', 'user', 'job {i}'); commit;")

    enqueue_s = await _enqueue_parallel(jobs, connections, enqueue)
    await pool.close()

    settings = Settings(_env_file=None, worker_transport="postgres", database_url=url, replicate_api_token="x",
                        replicate_base_url="http://127.0.0.1:9", worker_concurrency=concurrency,
                        usage_report_refresh_seconds=0, log_level="WARNING", worker_id="bench-peer-ours")
    store = await PostgresStore.connect(url, max_size=min(POOL_MAX, concurrency + 2))
    async with replicate_http(settings) as http:
        worker = Worker(settings, store, NoopProvider(http, settings), NoWakeups(), images=ImageResolver(settings, store))
        started = time.monotonic()
        task = asyncio.create_task(worker.run())
        deadline = started + 300
        while worker.counts["completed"] < jobs:
            failed = {k: v for k, v in worker.counts.items() if k.startswith("failed")}
            if task.done() or failed or time.monotonic() > deadline:
                worker.stop()
                raise RuntimeError(f"our worker did not complete the no-op runs: {dict(worker.counts)}")
            await asyncio.sleep(0.002)
        run_s = time.monotonic() - started
        worker.stop()
        await task
    await store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        done = conn.execute("select count(*) from assistant_runs where status = 'completed' and thread_id = any(%s)",
                            (threads,)).fetchone()[0]
    return _rates(jobs, enqueue_s, run_s) | {"completed": done, "counts": dict(worker.counts)}


async def procrastinate_side(url: str, jobs: int, concurrency: int, connections: int) -> dict[str, Any]:
    import procrastinate

    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create schema if not exists procrastinate")
    kwargs = {"options": "-c search_path=procrastinate"}
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=url, kwargs=kwargs, min_size=1, max_size=POOL_MAX))

    @app.task(name="noop")
    async def noop(i: int) -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        # Enqueue from `connections` concurrent requests, like ours (one defer = one request).
        enqueue_s = await _enqueue_parallel(jobs, connections, lambda i: noop.defer_async(i=i))
        started = time.monotonic()
        await app.run_worker_async(concurrency=concurrency, wait=False, install_signal_handlers=False,
                                   listen_notify=False, fetch_job_polling_interval=0.05)
        run_s = time.monotonic() - started
    with psycopg.connect(url, autocommit=True) as conn:
        done = conn.execute("select count(*) from procrastinate.procrastinate_jobs where status = 'succeeded'").fetchone()[0]
    return _rates(jobs, enqueue_s, run_s) | {"completed": done, "version": _version("procrastinate")}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _rates(jobs: int, enqueue_s: float, run_s: float) -> dict[str, Any]:
    return {"jobs": jobs, "enqueue_seconds": round(enqueue_s, 3), "run_seconds": round(run_s, 3),
            "enqueue_jobs_per_s": round(jobs / enqueue_s, 1), "run_jobs_per_s": round(jobs / run_s, 1),
            "total_jobs_per_s": round(jobs / (enqueue_s + run_s), 1)}


async def run_async(cluster: BenchCluster, dbname: str, jobs: int, concurrency: int, connections: int,
                    log: Any = print) -> dict[str, Any]:
    url = cluster.url(dbname)
    p = await procrastinate_side(url, jobs, concurrency, connections)
    log(f"    procrastinate: enqueue {p['enqueue_jobs_per_s']} jobs/s, run {p['run_jobs_per_s']} jobs/s")
    o = await ours(url, jobs, concurrency, connections)
    log(f"    ours: enqueue {o['enqueue_jobs_per_s']} jobs/s, run {o['run_jobs_per_s']} jobs/s")
    ratio = {k: round(o[k] / p[k], 2) for k in ("enqueue_jobs_per_s", "run_jobs_per_s", "total_jobs_per_s")}
    return {"jobs": jobs, "worker_concurrency": concurrency, "enqueue_connections": connections,
            "procrastinate": p, "ours": o, "ours_over_procrastinate": ratio}


def run(cluster: BenchCluster, dbname: str, jobs: int, concurrency: int = 32, connections: int = 8,
        log: Any = print) -> dict[str, Any]:
    return asyncio.run(run_async(cluster, dbname, jobs, concurrency, connections, log))
