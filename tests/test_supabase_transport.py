"""The supabase transport through the real supabase-py, postgrest and realtime clients, against a
loopback emulator of PostgREST and Realtime that executes RPC on the real database."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from postgrest.exceptions import APIError
from supabase import AsyncClientOptions, acreate_client

from tests.pipeline_helpers import finished_runs, new_user_thread, query, say, wait_until, worker_settings
from tests.supabase_emulator import SupabaseEmulator, make_jwt
from worker.app import build_worker, open_transport, replicate_http, web_http
from worker.pipeline import Worker
from worker.simulator import ReplicateSimulator
from worker.wakeups import RealtimeWakeups


@pytest.fixture
async def supabase(db_url: str) -> AsyncIterator[SupabaseEmulator]:
    emulator = SupabaseEmulator(db_url)
    await emulator.start()
    yield emulator
    await emulator.stop()


def supabase_settings(simulator: ReplicateSimulator, supabase: SupabaseEmulator, **overrides):
    return worker_settings(simulator.base_url, worker_transport="supabase", supabase_url=supabase.base_url,
                           supabase_service_role_key=supabase.service_role_key, **overrides)


async def start_worker(settings, wakeups=None) -> tuple[Worker, asyncio.Task, contextlib.AsyncExitStack]:
    transport = await open_transport(settings)
    if wakeups is not None:
        transport.wakeups = wakeups
    clients = contextlib.AsyncExitStack()
    replicate = await clients.enter_async_context(replicate_http(settings))
    web = await clients.enter_async_context(web_http(settings))
    worker = build_worker(settings, transport, replicate, web)
    return worker, asyncio.create_task(worker.run()), clients


async def stop_worker(worker: Worker, task: asyncio.Task, clients: contextlib.AsyncExitStack) -> None:
    worker.stop()
    await asyncio.wait_for(task, timeout=30)
    await clients.aclose()


async def live(worker: Worker) -> bool:
    return worker.wakeups.live


async def test_realtime_insert_wakes_the_worker_and_rpc_writes_the_reply(db_url, simulator, supabase) -> None:
    user, thread = await new_user_thread(db_url)
    worker, task, http = await start_worker(supabase_settings(simulator, supabase))
    try:
        await wait_until(lambda: live(worker), what="the Realtime subscription")
        # The sweep interval is an hour: only the Realtime push can wake the worker now.
        message = await say(db_url, user, thread, "Hello over Realtime")
        [run] = await finished_runs(db_url, 1)
    finally:
        await stop_worker(worker, task, http)
    assert run["status"] == "completed"
    [reply] = await query(db_url, "select content, model from assistant_messages where reply_to = %s", (message,))
    assert reply == {"content": "You said: Hello over Realtime", "model": "meta/meta-llama-3-8b-instruct"}

    [join] = supabase.joins
    assert join["topic"] == "realtime:assistant-worker"
    assert join["payload"]["config"]["postgres_changes"] == [
        {"event": "INSERT", "schema": "public", "table": "assistant_messages", "filter": "role=eq.user"},
        {"event": "UPDATE", "schema": "public", "table": "assistant_action_requests", "filter": "status=eq.approved"}]
    assert supabase.delivered >= 1
    functions = [c["fn"] for c in supabase.rpc_calls]
    assert "claim_runs" in functions and functions.count("complete_run") == 1
    complete = next(c for c in supabase.rpc_calls if c["fn"] == "complete_run")
    assert complete["headers"]["Authorization"] == f"Bearer {supabase.service_role_key}"
    assert complete["args"]["p_run_id"] == str(run["id"]) and complete["args"]["p_attempt"] == 1


async def test_messages_written_before_the_subscription_are_swept(db_url, simulator, supabase) -> None:
    user, thread = await new_user_thread(db_url)
    messages = [await say(db_url, user, thread, f"early {i}") for i in range(3)]
    worker, task, http = await start_worker(supabase_settings(simulator, supabase))
    try:
        runs = await finished_runs(db_url, 3)
    finally:
        await stop_worker(worker, task, http)
    assert {r["status"] for r in runs} == {"completed"}
    assert {r["message_id"] for r in runs} == set(messages)


async def test_dropped_and_refused_realtime_reconnects_and_answers_what_arrived_meanwhile(db_url, simulator, supabase) -> None:
    user, thread = await new_user_thread(db_url)
    settings = supabase_settings(simulator, supabase)
    wakeups = RealtimeWakeups(settings.supabase_url, supabase.service_role_key, check_seconds=0.1,
                              unhealthy_grace_seconds=1.0, realtime_options={"max_retries": 2, "initial_backoff": 0.1})
    worker, task, http = await start_worker(settings, wakeups)
    try:
        await wait_until(lambda: live(worker), what="the first subscription")
        supabase.refuse_for(2.0)
        await supabase.drop_connections()
        await wait_until(lambda: asyncio.sleep(0, not wakeups.live), what="the drop to be noticed")
        message = await say(db_url, user, thread, "sent while Realtime was down")
        assert supabase.delivered == 0  # nobody was subscribed to hear it
        [run] = await finished_runs(db_url, 1, timeout=30)
        # The sweep may answer before the refusal ends; the reconnection is awaited on its own.
        await wait_until(lambda: asyncio.sleep(0, len(supabase.joins) >= 2 and wakeups.live), 30,
                         "the subscription to be rebuilt")
    finally:
        await stop_worker(worker, task, http)
    assert run["status"] == "completed" and run["message_id"] == message
    assert wakeups.rebuilds >= 1  # realtime-py gave up within the outage; the supervisor rebuilt it
    assert len(supabase.joins) >= 2


async def test_rpc_errors_come_back_as_postgrest_errors(db_url, supabase) -> None:
    user, _ = await new_user_thread(db_url)
    options = AsyncClientOptions(auto_refresh_token=False, persist_session=False)
    as_user = await acreate_client(supabase.base_url, make_jwt("authenticated", sub=str(user)), options=options)
    with pytest.raises(APIError) as refusal:
        await as_user.rpc("claim_runs", {"p_worker": "me"}).execute()
    assert refusal.value.code == "42501" and "permission denied for function claim_runs" in refusal.value.message

    service = await acreate_client(supabase.base_url, supabase.service_role_key, options=options)
    with pytest.raises(APIError) as bad:
        await service.rpc("claim_runs", {"p_worker": "me", "p_limit": 0}).execute()
    assert bad.value.code == "22023" and "p_limit must be between 1 and 1000" in bad.value.message
    with pytest.raises(APIError) as missing:
        await service.rpc("complete_run", {"p_run_id": str(uuid.uuid4()), "p_attempt": 1, "p_content": "x",
                                           "p_model": "m"}).execute()
    assert missing.value.code == "P0002"
    status = await service.rpc("run_queue_status", {}).execute()
    assert status.data == [{"due_now": 0, "next_due_at": None, "in_progress": 0}]
