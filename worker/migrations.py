"""Applies the project's Supabase migrations to a PostgreSQL database, unchanged.

Applied versions are recorded in `supabase_migrations.schema_migrations`, the table the Supabase
CLI keeps, so a database migrated here and one migrated by `supabase db push` look the same.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg

MIGRATION_NAME = re.compile(r"^(\d{14})_(.+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text()


def supabase_dir(project_dir: Path | None = None) -> Path:
    """The `supabase/` folder: SUPABASE_DIR, else the project this package lives in, else cwd."""
    if project_dir is not None:
        return project_dir / "supabase"
    if "SUPABASE_DIR" in os.environ:
        return Path(os.environ["SUPABASE_DIR"])
    beside_package = Path(__file__).resolve().parent.parent / "supabase"
    return beside_package if beside_package.is_dir() else Path.cwd() / "supabase"


def list_migrations(project_dir: Path | None = None) -> list[Migration]:
    found = []
    for path in sorted((supabase_dir(project_dir) / "migrations").glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file name must be <YYYYMMDDHHMMSS>_<name>.sql: {path.name}")
        found.append(Migration(match.group(1), match.group(2), path))
    return found


def bootstrap_sql() -> str:
    """Makes plain PostgreSQL look like a fresh Supabase database (local databases only)."""
    return resources.files("worker").joinpath("sql/supabase_bootstrap.sql").read_text()


TRACKING_SQL = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
  version text primary key,
  statements text[],
  name text
);
"""


def applied_versions(conn: psycopg.Connection) -> set[str]:
    exists = conn.execute(
        "select to_regclass('supabase_migrations.schema_migrations') is not null"
    ).fetchone()
    if not exists or not exists[0]:
        return set()
    return {row[0] for row in conn.execute("select version from supabase_migrations.schema_migrations")}


def prepare(
    url: str, *, project_dir: Path | None = None, bootstrap: bool = True, seed: bool = True
) -> list[str]:
    """Bring the database at `url` up to date. Each pending migration runs in its own transaction
    together with its tracking row; the seed runs once, right after the first migrations.
    Returns the versions applied now."""
    applied_now: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        if bootstrap:
            conn.execute(bootstrap_sql())
        fresh = not applied_versions(conn)
        conn.execute(TRACKING_SQL)
        done = applied_versions(conn)
        for migration in list_migrations(project_dir):
            if migration.version in done:
                continue
            with conn.transaction():
                conn.execute(migration.sql())
                conn.execute(
                    "insert into supabase_migrations.schema_migrations (version, name, statements)"
                    " values (%s, %s, %s)",
                    (migration.version, migration.name, [migration.sql()]),
                )
            applied_now.append(migration.version)
        seed_file = supabase_dir(project_dir) / "seed.sql"
        if seed and fresh and applied_now and seed_file.exists():
            with conn.transaction():
                conn.execute(seed_file.read_text())
    return applied_now
