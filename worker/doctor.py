"""`python -m worker doctor`: checks a deployment from the worker's side and prints a table.

settings     the configuration loads (a bad one never gets here: one line, exit 2)
database     the database answers (directly, or PostgREST with the service role key)
migrations   the newest migration applied is the newest this worker ships
wake-ups     LISTEN works, or the Realtime subscription reaches "Subscribed to PostgreSQL"
replicate    Replicate accepts REPLICATE_API_TOKEN (GET /v1/account)
storage      Storage can sign attachment URLs (SUPABASE_URL and the key are set)

Exit status 0 when every check passes, 1 otherwise."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import httpx

from worker import migrations
from worker.config import Settings


@dataclass
class Check:
    name: str
    status: str  # "ok", "FAIL", "skip", "warn"
    detail: str


async def _wakeups_live(wakeups: object, timeout: float) -> bool:
    task = asyncio.create_task(wakeups.run(lambda *_: None))  # type: ignore[attr-defined]
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if wakeups.live:  # type: ignore[attr-defined]
                return True
            await asyncio.sleep(0.05)
        return False
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def run_checks(settings: Settings, database_url: str | None = None, *, timeout: float = 10.0) -> list[Check]:
    from worker.app import open_transport

    checks = [Check("settings", "ok", f"transport {settings.transport}"
                    + (" (embedded local database)" if settings.uses_embedded_database else ""))]
    transport = None
    try:
        transport = await open_transport(settings, database_url, open_timeout=timeout)
        status = await asyncio.wait_for(transport.store.queue_status(), timeout)
        checks.append(Check("database", "ok", f"{status.due_now} runs due, {status.in_progress} in progress"))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else f"no answer within {timeout:g}s"
        checks.append(Check("database", "FAIL", f"cannot reach the database: {reason}"))
    try:
        expected = migrations.list_migrations()[-1].version
        if transport is None or checks[-1].status != "ok":
            checks.append(Check("migrations", "skip", "needs the database"))
        else:
            applied = await asyncio.wait_for(transport.store.call("assistant_schema_version", {}), timeout)
            if applied == expected:
                checks.append(Check("migrations", "ok", f"at {applied}"))
            else:
                checks.append(Check("migrations", "FAIL", f"database at {applied or 'none'}, this worker needs {expected}:"
                                    " run `supabase db push`"))
    except Exception as exc:
        if "assistant_schema_version" in str(exc):  # the function came with a later migration
            detail = f"the database is older than this worker (it needs {expected}): run `supabase db push`"
        else:
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]} (run `supabase db push`)"
        checks.append(Check("migrations", "FAIL", detail))
    if transport is None:
        checks.append(Check("wake-ups", "skip", "needs the database"))
    else:
        kind = "Realtime subscription" if settings.transport == "supabase" else "LISTEN assistant_runs"
        live = await _wakeups_live(transport.wakeups, timeout)
        checks.append(Check("wake-ups", "ok" if live else "FAIL",
                            f"{kind} live" if live else f"{kind} not live after {timeout:g}s"
                            + (": is Realtime enabled for the project?" if settings.transport == "supabase" else "")))
    checks.append(await _replicate(settings, timeout))
    checks.append(Check("storage", "ok" if transport is not None and transport.signer else "warn",
                        "attachments can be signed" if transport is not None and transport.signer
                        else "storage:// images need SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY"))
    if transport is not None:
        with contextlib.suppress(Exception):
            await transport.store.close()
    return checks


async def _replicate(settings: Settings, timeout: float) -> Check:
    if settings.replicate_api_token is None:
        return Check("replicate", "FAIL", "REPLICATE_API_TOKEN is not set")
    url = f"{settings.replicate_base_url.rstrip('/')}/v1/account"
    try:
        async with httpx.AsyncClient(timeout=timeout) as http:
            response = await http.get(url, headers={
                "Authorization": f"Bearer {settings.replicate_api_token.get_secret_value()}"})
    except httpx.HTTPError as exc:
        return Check("replicate", "FAIL", f"cannot reach {settings.replicate_base_url} ({type(exc).__name__})")
    if response.status_code == 200:
        with contextlib.suppress(ValueError):
            return Check("replicate", "ok", f"token accepted (account {response.json().get('username', '?')})")
        return Check("replicate", "ok", "token accepted")
    if response.status_code in (401, 403):
        return Check("replicate", "FAIL", "Replicate refused REPLICATE_API_TOKEN")
    return Check("replicate", "FAIL", f"Replicate answered HTTP {response.status_code}")


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check'.ljust(width)}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{c.name.ljust(width)}  {c.status.ljust(6)}  {' '.join(c.detail.split())}" for c in checks]
    return "\n".join(lines)


def passed(checks: list[Check]) -> bool:
    return all(c.status != "FAIL" for c in checks)
