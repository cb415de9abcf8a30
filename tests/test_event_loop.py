"""`python -m worker run` runs on uvloop's event loop unless WORKER_EVENT_LOOP=asyncio. In a child
interpreter, with serve() replaced: the loop is the process's own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = r"""
import asyncio, json
import worker.__main__ as main
import worker.app

seen = {}

async def fake_serve(settings, database_url):
    loop = asyncio.get_running_loop()
    seen["loop"] = f"{type(loop).__module__}.{type(loop).__name__}"
    # a socket read on it, as the worker does
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    seen["echo"] = (await reader.readline()).decode().strip()
    writer.close()

async def greet(reader, writer):
    writer.write(b"hello\n")
    await writer.drain()
    writer.close()

async def start_then_serve(settings, database_url):
    global server
    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    async with server:
        await fake_serve(settings, database_url)

worker.app.serve = start_then_serve
main._run()
print(json.dumps(seen))
"""


@pytest.mark.parametrize(("setting", "loop"), [(None, "uvloop.Loop"), ("asyncio", "asyncio.unix_events._UnixSelectorEventLoop")])
def test_the_worker_runs_on_the_event_loop_it_is_set_to(setting: str | None, loop: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "postgresql://127.0.0.1:9/none", "REPLICATE_API_TOKEN": "x",
           "LOG_LEVEL": "ERROR", **({"WORKER_EVENT_LOOP": setting} if setting else {})}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"loop": loop, "echo": "hello"}
