"""Pipeline benchmark: closed-loop conversations against 1 or 2 `python -m worker run` processes
answered by the Replicate simulator (its own process) at a fixed model latency.

A conversation is a signed-in user with a new thread that holds 25 earlier exchanges, who inserts
a message (as PostgREST does: one transaction with `set local role authenticated` and the JWT
claims), waits for the reply and sends the next. The reply is noticed through a bench-only trigger
on assistant_messages that appends reply_to to an unlogged side table, polled by sequence every
few milliseconds (not NOTIFY: every notifying commit takes PostgreSQL's notify-queue lock, and the
worker's own NOTIFYs already contend for it; the bench must not add to that). The latency reported
is exact and taken from the database afterwards: commit timestamp of the reply row minus commit
timestamp of the user message row (`track_commit_timestamp = on` in the bench cluster). The
latency the client saw (commit acknowledged → notification received) is reported beside it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from psycopg_pool import AsyncConnectionPool

from bench.cluster import UNLIMITED_PLAN, BenchCluster, worker_env
from bench.measure import CpuMeter, process_tree, rss_mb, slope_per_minute, summary

PREFER_WAIT_SECONDS = 5  # >= every simulated latency: one create request per prediction, no polling
CLIENT_POOL_MAX = 40

BENCH_TRIGGER = """
create schema if not exists bench;
create unlogged table if not exists bench.replies (seq bigserial primary key, reply_to uuid not null);
create or replace function bench.record_reply() returns trigger
language plpgsql as $$
begin
  insert into bench.replies (reply_to) values (new.reply_to);
  return null;
end
$$;
drop trigger if exists bench_record_reply on public.assistant_messages;
create trigger bench_record_reply
  after insert on public.assistant_messages
  for each row when (new.role = 'assistant' and new.reply_to is not null)
  execute function bench.record_reply();
"""
POLL_SECONDS = 0.005
HISTORY_MESSAGES = 50  # what claim_runs reads of a thread's history (migration 20261122000600)


@dataclass(frozen=True)
class Point:
    conversations: int
    workers: int
    latency: float
    warmup: float
    duration: float
    soak: bool = False
    variant: str = "default"  # see VARIANTS

    @property
    def label(self) -> str:
        extra = "" if self.variant == "default" else f" [{self.variant}]"
        return f"{self.conversations} conv, {self.workers} worker(s), latency {self.latency:g}s{extra}"

    @property
    def key(self) -> str:
        return f"{self.conversations}-{self.workers}-{self.latency:g}-{self.variant}"


# The worker as shipped, and variants that each take one suspected cost away (run at one point).
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "no_streaming": {"STREAM_REPLIES": "false"},
    # Every reply streams at STREAM_PUBLISH_INTERVAL_MS whatever the number of replies streaming.
    "unbudgeted_streaming": {"STREAM_MAX_MESSAGES_PER_SECOND": "0"},
    # Every reply streams, however rarely the budget lets each publish (the default until
    # STREAM_MAX_INTERVAL_MS): the cost of reading every token of every reply.
    "every_reply_streams": {"STREAM_MAX_INTERVAL_MS": "0"},
    # httpcore does `import sniffio` on every request; without sniffio installed each request paid a
    # failed import (a sys.path scan). A stub module on PYTHONPATH showed what that cost (sniffio is
    # a dependency since).
    "sniffio_stub": {"_SNIFFIO_STUB": "1"},
    # Not a cost taken away but another load: each conversation waits a think time (uniform in
    # 0.5-1.5 s) between a reply and its next message, as people do. A closed loop without think
    # time keeps the pipeline saturated, so its latency is mostly queueing (conversations divided
    # by replies per second); paced, the latency is what the pipeline itself adds.
    "paced": {"_THINK_SECONDS": "1.0"},
    # asyncio's own event loop instead of uvloop's (the default since uvloop measured less worker CPU
    # per reply).
    "asyncio_loop": {"WORKER_EVENT_LOOP": "asyncio"},
}


def worker_variant_env(variant: str) -> dict[str, str]:
    """A variant's worker settings; keys starting with "_" are the bench's own."""
    return {k: v for k, v in VARIANTS[variant].items() if not k.startswith("_")}


SNIFFIO_STUB = '''"""Bench stub: what httpcore asks sniffio (the real package answers the same under asyncio)."""


def current_async_library() -> str:
    return "asyncio"
'''


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SimulatorProcess:
    def __init__(self, latency: float, logdir: Path) -> None:
        self.latency = latency
        self.log = open(logdir / f"simulator-{latency:g}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.simserver", "--latency", str(latency)],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=Path(__file__).resolve().parent.parent)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"the simulator did not start (see {self.log.name})")
        info = json.loads(line)
        self.base_url, self.stats_url = info["base_url"], info["stats_url"]

    async def stats(self, http: httpx.AsyncClient | None = None) -> dict[str, Any]:
        """With `http`, on that client: a new one builds an SSL context (≈10 ms of the bench
        client's CPU), which the monitor, asking every 0.5 s, must not pay each time."""
        if http is None:
            async with httpx.AsyncClient() as own:
                return await self.stats(own)
        return (await http.get(f"{self.stats_url}/stats", timeout=5)).json()

    async def reset(self) -> None:
        async with httpx.AsyncClient() as http:
            await http.post(f"{self.stats_url}/reset", timeout=5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class PipelineBench:
    def __init__(self, cluster: BenchCluster, dbname: str, workdir: Path, log: Any = print) -> None:
        self.cluster = cluster
        self.url = cluster.url(dbname)
        self.workdir = workdir
        self.say = log
        self.users: list[uuid.UUID] = []
        self.worker_logs: list[Path] = []
        self.metrics_urls: list[str] = []

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, users: int) -> None:
        """Signed-up users on the unlimited plan (the sign-up trigger gives them settings) and the
        bench-only reply trigger."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute("""
                insert into auth.users (id, aud, role, email)
                select gen_random_uuid(), 'authenticated', 'authenticated', 'pipeline' || g || '@bench.example'
                  from generate_series(1, %s) g
                returning id""", (users,)).fetchall()
            self.users = [r[0] for r in rows]
            conn.execute("update user_ai_settings set plan_id = %s where user_id = any(%s)", (UNLIMITED_PLAN, self.users))
            conn.execute(BENCH_TRIGGER)

    def new_threads(self, conversations: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """A thread per conversation, with a history as long as the worker reads (HISTORY_MESSAGES):
        a point measures the steady state of a conversation that has been going on, from its first
        message. From empty threads the work per reply (history read, prompt, request) grew for the
        first 25 exchanges: at 2 s latency the first minute, which also made memory look as if it
        grew under sustained load."""
        users = self.users[:conversations]
        threads = [uuid.uuid4() for _ in users]
        with psycopg.connect(self.url) as conn:
            conn.execute("insert into assistant_threads (id, user_id, title)"
                         " select t.id, t.user_id, 'bench' from unnest(%s::uuid[], %s::uuid[]) t(id, user_id)",
                         (threads, users))
            # Earlier exchanges, written as they would have been (a user message, its reply), without
            # the triggers: they are history, not work (no runs, nothing for the reply poller).
            conn.execute("set local session_replication_role = replica")
            conn.execute("""
                with exchange as materialized (
                  select t.id as thread_id, t.user_id, k, gen_random_uuid() as asked,
                         now() - interval '1 hour' + k * interval '10 seconds' as at
                    from unnest(%(threads)s::uuid[], %(users)s::uuid[]) t(id, user_id), generate_series(1, %(n)s) k)
                insert into assistant_messages (id, thread_id, user_id, role, content, reply_to, created_at)
                select asked, thread_id, user_id, 'user', format('Earlier message %%s: hello?', k), null, at
                  from exchange
                union all
                select gen_random_uuid(), thread_id, user_id, 'assistant', format('You said: Earlier message %%s: hello?', k),
                       asked, at + interval '2 seconds'
                  from exchange""", {"threads": threads, "users": users, "n": HISTORY_MESSAGES // 2})
            conn.commit()
            # Now, not in the window: autovacuum would come for the new rows, and the first reads
            # would set their hint bits.
            conn.autocommit = True
            conn.execute("vacuum (analyze) assistant_messages")
        return list(zip(users, threads, strict=True))

    # -- workers --------------------------------------------------------------------------------
    def start_workers(self, point: Point, sim: SimulatorProcess) -> list[subprocess.Popen]:
        concurrency = min(1000, max(32, point.conversations))
        procs = []
        self.metrics_urls = []
        for i in range(point.workers):
            env = worker_env()
            port = free_port()
            self.metrics_urls.append(f"http://127.0.0.1:{port}/metrics")
            variant = VARIANTS[point.variant]
            if variant.get("_SNIFFIO_STUB"):
                stub = self.workdir / "sniffio_stub"
                stub.mkdir(exist_ok=True)
                (stub / "sniffio.py").write_text(SNIFFIO_STUB)
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stub), env.get("PYTHONPATH")]))
            env.update({
                "DATABASE_URL": self.url, "WORKER_TRANSPORT": "postgres", "REPLICATE_API_TOKEN": "x",
                "REPLICATE_BASE_URL": sim.base_url, "REPLICATE_MAX_CREATES_PER_MINUTE": "0",
                "REPLICATE_PREFER_WAIT_SECONDS": str(PREFER_WAIT_SECONDS), "WORKER_CONCURRENCY": str(concurrency),
                "USAGE_REPORT_REFRESH_SECONDS": "0", "LOG_LEVEL": "WARNING", "WORKER_SHUTDOWN_GRACE_SECONDS": "5",
                "WORKER_ID": f"bench-w{i}", "PGAPPNAME": f"bench-worker-{i}", "METRICS_PORT": str(port),
                **worker_variant_env(point.variant),
            })
            logfile = self.workdir / f"worker-{point.key}-{i}.log"
            self.worker_logs.append(logfile)
            with open(logfile, "w") as err:
                procs.append(subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env, cwd=self.workdir,
                                              stdout=subprocess.DEVNULL, stderr=err))
        return procs

    async def wait_ready(self, procs: list[subprocess.Popen], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            while True:
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"a worker exited at start-up (see {self.workdir})")
                # Ready once each worker's LISTEN connection is up (the worker sweeps right after).
                cur = await conn.execute("""
                    select count(distinct application_name) from pg_stat_activity
                     where application_name like 'bench-worker-%%' and query like 'listen %%'""")
                if (await cur.fetchone())[0] >= len(procs):
                    await asyncio.sleep(0.3)
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError("workers did not start listening in time")
                await asyncio.sleep(0.1)

    @staticmethod
    def stop_workers(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # -- one point ------------------------------------------------------------------------------
    async def run_point(self, point: Point, sim: SimulatorProcess) -> dict[str, Any]:
        pairs = self.new_threads(point.conversations)
        thread_ids = [t for _, t in pairs]
        await sim.reset()
        procs = self.start_workers(point, sim)
        try:
            await self.wait_ready(procs)
            result = await self._drive(point, sim, pairs, procs)
            await self._wait_queue_empty(timeout=30 + point.latency * 2)
            result["worker_rss_mb"]["after_drain"] = [round(rss_mb(p.pid) or 0, 1) for p in procs]
        finally:
            self.stop_workers(procs)
        result.update(await self._latencies(thread_ids, result.pop("_window")))
        result["worker_exit_codes"] = [p.returncode for p in procs]
        result["worker_warnings"] = self._count_warnings(point)
        return result

    def _count_warnings(self, point: Point) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for i in range(point.workers):
            path = self.workdir / f"worker-{point.key}-{i}.log"
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    counts["(not json)"] += 1
                    continue
                counts[str(record.get("event") or record.get("message", "?"))] += 1
        return dict(counts)

    async def _wait_queue_empty(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                cur = await conn.execute("select count(*) from assistant_runs where status in ('queued', 'in_progress')")
                if (await cur.fetchone())[0] == 0:
                    return
                await asyncio.sleep(0.1)
            # Left over (should not happen): end them so that the next point starts clean.
            await conn.execute("""update assistant_runs set status = 'cancelled', lease_owner = null,
                                         lease_expires_at = null, finished_at = now()
                                   where status in ('queued', 'in_progress')""")

    async def _drive(self, point: Point, sim: SimulatorProcess, pairs: list[tuple[uuid.UUID, uuid.UUID]],
                     procs: list[subprocess.Popen]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        waiting: dict[str, asyncio.Future[float]] = {}
        stop = asyncio.Event()
        client_samples: list[tuple[float, float]] = []  # (commit acknowledged at, latency seconds)
        # (commit acknowledged at, seconds from the decision to send to the acknowledgement: waiting for one of
        # the client's CLIENT_POOL_MAX connections included, as a PostgREST request waits for its pool)
        send_samples: list[tuple[float, float]] = []
        timeouts = 0
        errors: Counter[str] = Counter()

        sent_at: dict[str, float] = {}
        poller = await psycopg.AsyncConnection.connect(self.url, autocommit=True, application_name="bench-poller")
        start_seq = (await (await poller.execute("select coalesce(max(seq), 0) from bench.replies")).fetchone())[0]

        def arrived(reply_to: str, at: float) -> None:
            sent_at.pop(reply_to, None)
            fut = waiting.pop(reply_to, None)
            if fut is not None and not fut.done():
                fut.set_result(at)

        async def listen() -> None:
            """Polls the side table by sequence. A sequence number below the highest seen that has
            not shown up yet belongs to a transaction not yet committed (or rolled back): it is
            asked for again until it shows up, for at most 10 s."""
            high = start_seq
            gaps: dict[int, float] = {}
            last_fallback = time.monotonic()
            while True:
                cur = await poller.execute("select seq, reply_to::text from bench.replies where seq > %s or seq = any(%s)",
                                           (high, list(gaps)))
                now = time.monotonic()
                for seq, reply_to in await cur.fetchall():
                    gaps.pop(seq, None)
                    if seq > high:
                        gaps.update((missing, now) for missing in range(high + 1, seq))
                        high = seq
                    arrived(reply_to, now)
                for seq in [g for g, since in gaps.items() if now - since > 10]:
                    del gaps[seq]
                if now - last_fallback > 2:  # safety net: ask directly for replies overdue by 2 s
                    last_fallback = now
                    overdue = [m for m, t in sent_at.items() if now - t > point.latency + 2]
                    if overdue:
                        cur = await poller.execute("select reply_to::text from public.assistant_messages"
                                                   " where reply_to = any(%s::uuid[])", (overdue,))
                        for (reply_to,) in await cur.fetchall():
                            arrived(reply_to, time.monotonic())
                await asyncio.sleep(POLL_SECONDS)

        pool = AsyncConnectionPool(self.url, min_size=min(point.conversations, CLIENT_POOL_MAX),
                                   max_size=min(point.conversations, CLIENT_POOL_MAX), open=False,
                                   kwargs={"autocommit": True, "application_name": "bench-client"})
        await pool.open(wait=True, timeout=60)

        think = float(VARIANTS[point.variant].get("_THINK_SECONDS", 0))
        pacing = random.Random(7)

        async def conversation(index: int, user: uuid.UUID, thread: uuid.UUID) -> None:
            nonlocal timeouts
            if think:  # paced conversations start spread over one think time
                await asyncio.sleep(pacing.uniform(0, think))
            claims = json.dumps({"sub": str(user), "role": "authenticated", "aud": "authenticated"})
            n = 0
            while not stop.is_set():
                message_id = uuid.uuid4()
                fut: asyncio.Future[float] = loop.create_future()
                waiting[str(message_id)] = fut
                sent_at[str(message_id)] = sent = time.monotonic()
                # One round trip, as PostgREST sends one request: the role and claims are local to it.
                sql = ("begin; set local role authenticated; "
                       f"select set_config('request.jwt.claims', '{claims}', true); "
                       "insert into public.assistant_messages (id, thread_id, role, content) "
                       f"values ('{message_id}', '{thread}', 'user', 'Message {n} of conversation {index}: hello?'); "
                       "commit;")
                try:
                    async with pool.connection() as conn:
                        await conn.execute(sql)
                except psycopg.Error as exc:
                    errors[type(exc).__name__] += 1
                    waiting.pop(str(message_id), None)
                    sent_at.pop(str(message_id), None)
                    await asyncio.sleep(0.05)
                    continue
                committed = time.monotonic()
                send_samples.append((committed, committed - sent))
                try:
                    # A closed loop: no next message before this one's reply (however long it takes).
                    replied = await asyncio.wait_for(fut, timeout=300)
                except asyncio.TimeoutError:
                    timeouts += 1
                    waiting.pop(str(message_id), None)
                    sent_at.pop(str(message_id), None)
                    continue
                client_samples.append((committed, replied - committed))
                n += 1
                if think:
                    await asyncio.sleep(pacing.uniform(0.5, 1.5) * think)

        # Monitors: memory of the workers and queue depth every 0.5 s; wait events every 0.1 s.
        rss_series: list[tuple[float, list[float]]] = []
        inflight_series: list[float] = []
        http = httpx.AsyncClient()
        queue_series: list[tuple[float, int, int, int]] = []
        waits: Counter[tuple[str, str]] = Counter()
        wait_samples = 0
        started = time.monotonic()

        async def monitor() -> None:
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                             application_name="bench-monitor") as conn:
                while True:
                    rss_series.append((time.monotonic() - started, [rss_mb(p.pid) or 0.0 for p in procs]))
                    # One count per status, each from its partial index: the table holds every
                    # earlier point's runs too, and a scan of it cost PostgreSQL ~30 ms a sample.
                    cur = await conn.execute("""select (select count(*) from assistant_runs where status = 'queued'),
                                                      (select count(*) from assistant_runs where status = 'in_progress')""")
                    queued, in_progress = await cur.fetchone()
                    try:
                        running = (await sim.stats(http))["running"]
                    except httpx.HTTPError:
                        running = -1
                    queue_series.append((time.monotonic() - started, queued, in_progress, running))
                    inflight_series.append(await self._worker_in_flight(http))
                    await asyncio.sleep(0.5)

        async def sample_waits() -> None:
            nonlocal wait_samples
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                             application_name="bench-monitor") as conn:
                while True:
                    cur = await conn.execute("""
                        select application_name, coalesce(wait_event_type || ':' || wait_event, 'CPU')
                          from pg_stat_activity
                         where state = 'active' and backend_type = 'client backend' and pid <> pg_backend_pid()
                           and application_name like 'bench-%%'""")
                    for app, event in await cur.fetchall():
                        waits[("worker" if app.startswith("bench-worker") else app.removeprefix("bench-"), event)] += 1
                    wait_samples += 1
                    await asyncio.sleep(0.1)

        postmaster = self.cluster.postmaster_pid()
        worker_ps = [psutil.Process(p.pid) for p in procs]
        cpu = CpuMeter({
            "workers": lambda: worker_ps,
            "postgres": lambda: process_tree(postmaster),
            "simulator": lambda: [psutil.Process(sim.proc.pid)],
            "bench_client": lambda: [psutil.Process(os.getpid())],
        })

        listen_task = asyncio.create_task(listen())
        monitor_task = asyncio.create_task(monitor())
        tasks = [asyncio.create_task(conversation(i, u, t)) for i, (u, t) in enumerate(pairs)]
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True, application_name="bench-ctl") as ctl:
            async def server_now() -> float:
                return float((await (await ctl.execute("select extract(epoch from clock_timestamp())")).fetchone())[0])

            await asyncio.sleep(point.warmup)
            await ctl.execute("select pg_stat_statements_reset()")
            window_start, mono_start = await server_now(), time.monotonic()
            cpu.begin()
            streams_before = await self._worker_samples(http)
            waits_task = asyncio.create_task(sample_waits())
            await asyncio.sleep(point.duration)
            window_end, mono_end = await server_now(), time.monotonic()
            cpu_used = cpu.end()
            streams_after = await self._worker_samples(http)
            # CPU of processes outside the bench (another test suite on the machine, …).
            capacity = (mono_end - mono_start) * (os.cpu_count() or 1)
            ours = sum(v for k, v in cpu_used.items() if k != "machine_busy_fraction")
            cpu_used["other_processes"] = round(max(0.0, cpu_used["machine_busy_fraction"] * capacity - ours), 3)
            cpu_used["other_share_of_machine"] = round(cpu_used["other_processes"] / capacity, 3)
            waits_task.cancel()
            statements = await (await ctl.execute("""
                select calls, rows, round(total_exec_time::numeric, 1)::float as total_ms,
                       round(mean_exec_time::numeric, 3)::float as mean_ms, toplevel,
                       left(regexp_replace(query, '\\s+', ' ', 'g'), 200) as query
                  from pg_stat_statements
                 where dbid = (select oid from pg_database where datname = current_database())
                 order by total_exec_time desc limit 15""")).fetchall()
            stop.set()
            await asyncio.wait(tasks, timeout=35 + point.latency)
        for task in (*tasks, listen_task, monitor_task, waits_task):
            task.cancel()
        await asyncio.gather(*tasks, listen_task, monitor_task, waits_task, return_exceptions=True)
        await pool.close()
        await poller.close()
        await http.aclose()
        sim_stats = await sim.stats()

        in_window = [lat * 1000 for at, lat in client_samples if mono_start <= at < mono_end]
        window_rss = [(t, rss) for t, rss in rss_series if mono_start - started <= t <= mono_end - started]
        rss = self._rss_summary(rss_series, window_rss, len(procs))
        window_queue = [q for q in queue_series if mono_start - started <= q[0] <= mono_end - started]
        replies_in_window = max(1, len(in_window))
        return {
            "_window": (window_start, window_end),
            "client_latency_ms": summary(in_window),
            "client_send_ms": summary([d * 1000 for at, d in send_samples if mono_start <= at < mono_end]),
            "client_timeouts": timeouts,
            "client_errors": dict(errors),
            "peak_inflight_predictions": sim_stats["peak_running"],
            "peak_open_requests_at_simulator": sim_stats["peak_open_requests"],
            "peak_runs_in_flight_at_workers": max(inflight_series, default=None),
            # Predictions started in the window whose reply streamed, or was written whole because
            # the stream budget was full (STREAM_MAX_INTERVAL_MS); 0 and 0 without STREAM_REPLIES;
            # None if a worker's /metrics could not be read at either end of the window.
            "reply_streams": None if not (streams_before[1] and streams_after[1]) else {
                o: round(streams_after[0].get(f'assistant_reply_streams_total{{outcome="{o}"}}', 0.0)
                         - streams_before[0].get(f'assistant_reply_streams_total{{outcome="{o}"}}', 0.0))
                for o in ("streamed", "whole")},
            "predictions_created": sim_stats["total_creates"],
            "worker_rss_mb": rss,
            "rss_series": [(round(t, 1), [round(x, 1) for x in r]) for t, r in rss_series],
            "queue_depth": {
                "queued_mean": round(statistics.fmean(q[1] for q in window_queue), 1) if window_queue else None,
                "queued_max": max((q[1] for q in window_queue), default=None),
                "in_progress_mean": round(statistics.fmean(q[2] for q in window_queue), 1) if window_queue else None,
                "running_predictions_mean": round(statistics.fmean(q[3] for q in window_queue), 1) if window_queue else None,
            },
            "cpu_seconds": cpu_used,
            "cpu_ms_per_reply": {k: round(v * 1000 / replies_in_window, 3) for k, v in cpu_used.items()
                                 if k in ("workers", "postgres", "simulator", "bench_client")},
            "wait_events": [{"who": who, "event": event, "share_of_samples": round(n / max(1, wait_samples), 3)}
                            for (who, event), n in waits.most_common(12)],
            "active_backends_mean": round(sum(waits.values()) / max(1, wait_samples), 2),
            "top_statements": [{"calls": c, "rows": r, "total_ms": t, "mean_ms": m, "toplevel": top, "query": q}
                               for c, r, t, m, top, q in statements],
            "claims": _claims(statements),
        }

    async def _worker_samples(self, http: httpx.AsyncClient) -> tuple[dict[str, float], bool]:
        """The workers' /metrics samples (name with labels → value), summed over the workers that
        answered, and whether all did (a sum without one is no total to take differences of)."""
        total: dict[str, float] = {}
        complete = True
        for url in self.metrics_urls:
            try:
                text = (await http.get(url, timeout=2)).text
            except httpx.HTTPError:
                complete = False
                continue
            for line in text.splitlines():
                if line.startswith("assistant_"):
                    name, _, value = line.rpartition(" ")
                    total[name] = total.get(name, 0.0) + float(value)
        return total, complete

    async def _worker_in_flight(self, http: httpx.AsyncClient) -> float:
        """Sum of the workers' own `assistant_runs_in_flight` gauges (of those that answered)."""
        return (await self._worker_samples(http))[0].get("assistant_runs_in_flight", 0.0)

    @staticmethod
    def _rss_summary(series: list[tuple[float, list[float]]], window: list[tuple[float, list[float]]],
                     workers: int) -> dict[str, Any]:
        out: dict[str, Any] = {"per_worker": []}
        for i in range(workers):
            values = [r[i] for _, r in series if r[i] > 0]
            win = [(t, r[i]) for t, r in window if r[i] > 0]
            quarter = max(1, len(win) // 4)
            first = statistics.median(v for _, v in win[:quarter]) if win else None
            last = statistics.median(v for _, v in win[-quarter:]) if win else None
            out["per_worker"].append({
                "start": round(values[0], 1) if values else None,
                "peak": round(max(values), 1) if values else None,
                "end": round(values[-1], 1) if values else None,
                "window_first_quarter_median": round(first, 1) if first else None,
                "window_last_quarter_median": round(last, 1) if last else None,
                "window_growth_pct": round((last - first) / first * 100, 2) if first and last else None,
                "window_slope_mb_per_min": round(s, 3) if (s := slope_per_minute(win)) is not None else None,
            })
        out["peak_total"] = round(max((sum(r) for _, r in series), default=0), 1)
        return out

    async def _latencies(self, thread_ids: list[uuid.UUID], window: tuple[float, float]) -> dict[str, Any]:
        """Exact latencies from commit timestamps, for user messages committed in the window."""
        start, end = window
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            rows = await (await conn.execute("""
                select extract(epoch from pg_xact_commit_timestamp(u.xmin))::float as user_at,
                       extract(epoch from pg_xact_commit_timestamp(r.xmin))::float as reply_at,
                       r.metadata_json ? 'error_code' as failed
                  from assistant_messages u
                  join assistant_messages r on r.reply_to = u.id
                 where u.thread_id = any(%s) and u.role = 'user'""", (thread_ids,))).fetchall()
            unanswered = (await (await conn.execute("""
                select count(*) from assistant_messages u
                 where u.thread_id = any(%s) and u.role = 'user'
                   and not exists (select 1 from assistant_messages r where r.reply_to = u.id)""",
                (thread_ids,))).fetchone())[0]
        latencies = [(reply - user) * 1000 for user, reply, _ in rows if start <= user < end]
        replies_in_window = sum(1 for _, reply, _ in rows if start <= reply < end)
        return {
            "window_seconds": round(end - start, 3),
            "replies_in_window": replies_in_window,
            "replies_per_second": round(replies_in_window / (end - start), 1),
            "latency_ms": summary(latencies),
            "failed_replies": sum(1 for user, _, failed in rows if failed and start <= user < end),
            "unanswered_messages": unanswered,
        }


def _claims(statements: list[tuple]) -> dict[str, Any] | None:
    """claim_runs calls against the runs they returned: every hint wakes every worker, and each
    claims; a claim that finds nothing is a round trip spent for nothing."""
    for calls, rows, total, mean, toplevel, query in statements:
        if toplevel and "claim_runs(" in query:
            return {"calls": calls, "runs_returned": rows, "runs_per_call": round(rows / calls, 2) if calls else None,
                    "mean_ms": mean, "total_ms": total}
    return None


def overhead(latency_ms: dict[str, Any], model_latency_s: float) -> dict[str, Any]:
    """The pipeline's own share: measured latency minus the simulated model latency."""
    return {k: (round(v - model_latency_s * 1000, 2) if isinstance(v, float) and k != "n" else v)
            for k, v in latency_ms.items()}


BUSY_MACHINE_SHARE = 0.15


async def wait_quiet(log: Any, limit: float = 120.0) -> None:
    """Waits (at most `limit` s) until the machine is below BUSY_MACHINE_SHARE busy for 3 s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        share = await asyncio.to_thread(psutil.cpu_percent, 3.0) / 100
        if share < BUSY_MACHINE_SHARE:
            return
    log(f"  the machine stayed busy for {limit:g} s; measuring anyway")


async def run(cluster: BenchCluster, dbname: str, workdir: Path, points: list[Point], log: Any = print) -> list[dict[str, Any]]:
    bench = PipelineBench(cluster, dbname, workdir, log)
    bench.setup(max(p.conversations for p in points))
    results = []
    for latency in sorted({p.latency for p in points}):
        sim = SimulatorProcess(latency, workdir)
        try:
            for point in [p for p in points if p.latency == latency]:
                began = time.monotonic()
                result = await bench.run_point(point, sim)
                busy = result["cpu_seconds"]["other_share_of_machine"]
                if busy > BUSY_MACHINE_SHARE:
                    log(f"  {point.label}: other processes used {busy:.0%} of the machine; measuring again when quiet")
                    await wait_quiet(log)
                    result = await bench.run_point(point, sim)
                    result["first_attempt_other_share_of_machine"] = busy
                result["overhead_ms"] = overhead(result["latency_ms"], point.latency)
                result.update(conversations=point.conversations, workers=point.workers, latency_s=point.latency,
                              warmup_s=point.warmup, duration_s=point.duration, soak=point.soak, variant=point.variant,
                              variant_env=worker_variant_env(point.variant),
                              worker_concurrency=min(1000, max(32, point.conversations)),
                              wall_seconds=round(time.monotonic() - began, 1))
                lat = result["latency_ms"]
                log(f"  {point.label}: {result['replies_per_second']} replies/s, latency p50 {lat['p50']} ms,"
                    f" p95 {lat['p95']} ms, p99 {lat['p99']} ms, peak in flight {result['peak_inflight_predictions']},"
                    f" runs in flight at workers (peak) {result['peak_runs_in_flight_at_workers']},"
                    f" worker RSS peak {[w['peak'] for w in result['worker_rss_mb']['per_worker']]} MB"
                    f" ({result['wall_seconds']} s)")
                results.append(result)
        finally:
            with contextlib.suppress(Exception):
                sim.stop()
    return results
