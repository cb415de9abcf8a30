"""A dedicated embedded PostgreSQL cluster for the benchmarks, prepared like the test cluster
(`LocalDatabase(fast=True)`, migrations applied unchanged) plus bench-only settings: a larger
buffer cache, commit timestamps (exact INSERT-commit → reply-commit latencies) and
pg_stat_statements (where the time goes)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg

from worker import migrations
from worker.localdb import LocalDatabase

# Server settings of the bench cluster on top of LocalDatabase's fast settings (fsync, full page
# writes and synchronous commit off: a throwaway cluster). Applied with ALTER SYSTEM + restart.
BENCH_SETTINGS = {
    "shared_buffers": "2GB",
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",  # statements inside claim_runs()/complete_run() too
    "pg_stat_statements.max": "5000",
    "track_commit_timestamp": "on",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "512MB",
}

UNLIMITED_PLAN = "bench_unlimited"
LIMITED_PLAN = "bench_limited"


class BenchCluster:
    def __init__(self, data_dir: Path) -> None:
        self.db = LocalDatabase(data_dir, fast=True, max_connections=400)

    def start(self) -> None:
        self.db.start()
        with psycopg.connect(self.db.url(), autocommit=True) as conn:
            for key, value in BENCH_SETTINGS.items():
                conn.execute(f"alter system set {key} = '{value}'")
        self.db.restart()

    def stop(self) -> None:
        self.db.destroy()

    def url(self, dbname: str = "postgres") -> str:
        return self.db.url(dbname)

    def postmaster_pid(self) -> int:
        return int((self.db.pgdata / "postmaster.pid").read_text().split()[0])

    def server_version(self) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            return str(conn.execute("show server_version").fetchone()[0])

    def settings(self) -> dict[str, str]:
        names = ["shared_buffers", "fsync", "synchronous_commit", "full_page_writes", "max_connections",
                 "track_commit_timestamp", "work_mem"]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            return {n: str(conn.execute(f"show {n}").fetchone()[0]) for n in names}

    def migrated_template(self, name: str = "bench_template") -> str:
        """A database with the project's migrations (no seed), the bench plans and
        pg_stat_statements; the scenario databases are copies of it."""
        started = time.monotonic()
        url = self.db.create_database(name)
        migrations.prepare(url, seed=False)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("create extension if not exists pg_stat_statements")
            # A plan without limits (pipeline users) and one with the shape of `premium` but
            # limits never reached (admission at scale checks and counts four limits, and what
            # the user's requests in flight hold of the token limit).
            conn.execute("insert into ai_plans (id, name) values (%s, 'Bench')", (UNLIMITED_PLAN,))
            conn.execute("insert into ai_plans (id, name, reserve_tokens) values (%s, 'Bench with limits', 4000)",
                         (LIMITED_PLAN,))
            conn.execute("""
                insert into ai_plan_limits (plan_id, metric, time_window, limit_value) values
                  (%(p)s, 'messages', 'day', 1e9), (%(p)s, 'vision_messages', 'day', 1e9),
                  (%(p)s, 'requests', 'hour', 1e9), (%(p)s, 'tokens', 'month', 1e12)""", {"p": LIMITED_PLAN})
        self.template_seconds = time.monotonic() - started
        return name

    def create_database(self, name: str, template: str) -> str:
        return self.db.create_database(name, template=template)


def worker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process without settings that could leak in from the shell."""
    env = dict(base if base is not None else os.environ)
    for key in list(env):
        if key.startswith(("WORKER_", "REPLICATE_", "SUPABASE_", "DATABASE_URL", "CHAT_MODEL", "VISION_MODEL",
                           "LOCAL_DB_DIR", "PG")):
            del env[key]
    return env
