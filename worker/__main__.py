"""Command line: `python -m worker db up|down|reset` and `python -m worker run`."""

from __future__ import annotations

import argparse
from worker.localdb import LocalDatabase, default_data_dir


def _db(action: str) -> int:
    db = LocalDatabase(default_data_dir())
    if action == "up":
        print(f"local database: {db.data_dir}", flush=True)
        print(db.up())
    elif action == "down":
        db.stop()
        print(f"local database in {db.data_dir} stopped")
    elif action == "reset":
        db.destroy()
        print(f"local database in {db.data_dir} recreated", flush=True)
        print(db.up())
    return 0


def _run() -> int:
    db = LocalDatabase(default_data_dir())
    url = db.up()
    print(f"local database is up at {url}")
    print("the worker daemon is not built yet; the database stays up (`python -m worker db down` stops it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="the embedded local database")
    db.add_argument("action", choices=["up", "down", "reset"])
    commands.add_parser("run", help="run the worker on the configured transport")
    args = parser.parse_args(argv)
    if args.command == "db":
        return _db(args.action)
    return _run()


if __name__ == "__main__":
    raise SystemExit(main())
