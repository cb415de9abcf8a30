"""`python -m worker db up|down|reset` against a cluster of its own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg

from tests.conftest import PROJECT_DIR


def _worker(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOCAL_DB_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True, timeout=120, check=True)


def test_db_up_is_idempotent_and_reset_recreates(tmp_path: Path) -> None:
    data_dir = tmp_path / "db"
    try:
        url = _worker("db", "up", data_dir=data_dir).stdout.strip().splitlines()[-1]
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("select count(*) from supabase_migrations.schema_migrations").fetchone()[0] >= 1
            conn.execute("create table marker (x int)")

        assert _worker("db", "up", data_dir=data_dir).stdout.strip().splitlines()[-1] == url
        with psycopg.connect(url) as conn:
            assert conn.execute("select to_regclass('public.marker') is not null").fetchone()[0]

        _worker("db", "down", data_dir=data_dir)
        try:
            psycopg.connect(url, connect_timeout=2).close()
            raise AssertionError("database still reachable after `db down`")
        except psycopg.OperationalError:
            pass

        url = _worker("db", "reset", data_dir=data_dir).stdout.strip().splitlines()[-1]
        with psycopg.connect(url) as conn:
            assert not conn.execute("select to_regclass('public.marker') is not null").fetchone()[0]
            assert conn.execute("select to_regclass('public.assistant_messages') is not null").fetchone()[0]
    finally:
        _worker("db", "down", data_dir=data_dir)


def test_a_port_taken_between_picking_and_binding_is_replaced(tmp_path: Path, monkeypatch) -> None:
    """Another process (a second cluster starting on the machine) binds the port picked for this
    one before PostgreSQL does: the start picks another instead of failing."""
    from worker import localdb

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy])
        free_port = localdb._free_port
        monkeypatch.setattr(localdb, "_free_port", lambda: next(picks, None) or free_port())
        db = localdb.LocalDatabase(tmp_path / "db", fast=True)
        try:
            db.start()
            assert db.port not in (None, busy)
            with psycopg.connect(db.url()) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
            assert "could not bind" in db.log_file.read_text()  # the first try, on the taken port
        finally:
            db.destroy()
