"""`python -m worker doctor` on a healthy and on a broken setup."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys

import psycopg

from tests.conftest import PROJECT_DIR
from tests.supabase_emulator import SupabaseEmulator

ROLLBACKS = PROJECT_DIR / "supabase" / "rollbacks"


async def doctor(**env: str) -> tuple[int, dict[str, tuple[str, str]]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "DATABASE_URL", "REPLICATE_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "doctor", cwd=PROJECT_DIR, env={**clean, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    rows = {}
    for line in filter(None, out.decode().splitlines()[2:]):
        assert re.match(r"^(\S+)\s+(\S+)\s*(.*)$", line), out.decode()
        name, result, detail = re.match(r"^(\S+)\s+(\S+)\s*(.*)$", line).groups()  # type: ignore[union-attr]
        rows[name] = (result, detail)
    return process.returncode, rows


async def test_a_healthy_postgres_deployment(db_url, simulator) -> None:
    code, rows = await doctor(DATABASE_URL=db_url, WORKER_TRANSPORT="postgres", REPLICATE_API_TOKEN="r8_test",
                              REPLICATE_BASE_URL=simulator.base_url)
    assert code == 0, rows
    assert [name for name in rows] == ["settings", "database", "migrations", "wake-ups", "replicate", "storage"]
    assert rows["migrations"][0] == "ok" and rows["migrations"][1].startswith("at 2026")
    assert rows["wake-ups"] == ("ok", "LISTEN assistant_runs live")
    assert rows["replicate"] == ("ok", "token accepted (account simulator)")
    assert rows["storage"][0] == "warn"


async def test_a_healthy_supabase_deployment(db_url, simulator) -> None:
    emulator = SupabaseEmulator(db_url)
    await emulator.start()
    try:
        code, rows = await doctor(SUPABASE_URL=emulator.base_url, SUPABASE_SERVICE_ROLE_KEY=emulator.service_role_key,
                                  REPLICATE_API_TOKEN="r8_test", REPLICATE_BASE_URL=simulator.base_url)
    finally:
        await emulator.stop()
    assert code == 0, rows
    assert rows["settings"] == ("ok", "transport supabase")
    assert rows["wake-ups"] == ("ok", "Realtime subscription live")
    assert rows["storage"] == ("ok", "attachments can be signed")


async def test_a_broken_deployment_says_what_is_wrong(db_url, simulator) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:  # the database is one migration behind
        [script] = sorted(ROLLBACKS.glob("*.down.sql"))[-1:]
        conn.execute(script.read_text())
    code, rows = await doctor(DATABASE_URL=db_url, WORKER_TRANSPORT="postgres", REPLICATE_API_TOKEN="r8_wrong",
                              REPLICATE_BASE_URL=simulator.base_url)
    assert code == 1
    assert rows["database"][0] == "ok"
    assert rows["migrations"][0] == "FAIL" and "run `supabase db push`" in rows["migrations"][1]
    assert rows["replicate"] == ("FAIL", "Replicate refused REPLICATE_API_TOKEN")


async def test_an_unreachable_database_and_replicate(simulator) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    code, rows = await doctor(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed_port}/postgres",
                              WORKER_TRANSPORT="postgres", REPLICATE_API_TOKEN="r8_test",
                              REPLICATE_BASE_URL=f"http://127.0.0.1:{closed_port}", DOCTOR_TIMEOUT_SECONDS="2")
    assert code == 1
    assert rows["database"][0] == "FAIL" and rows["database"][1].startswith("cannot reach the database")
    assert rows["migrations"] == ("skip", "needs the database") and rows["wake-ups"] == ("skip", "needs the database")
    assert rows["replicate"][0] == "FAIL" and "cannot reach" in rows["replicate"][1]
