"""The supabase transport through the real supabase-py, postgrest and realtime clients, against a
loopback emulator of PostgREST and Realtime that executes RPC on the real database."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from postgrest.exceptions import APIError
from psycopg.types.json import Jsonb
from supabase import AsyncClientOptions, acreate_client

from tests.pipeline_helpers import as_user, checking, finished_runs, new_user_thread, query, say, wait_until, worker_settings
from tests.supabase_emulator import SupabaseEmulator, make_jwt, pg_error_status
from worker.app import build_worker, open_transport, replicate_http, web_http
from worker.pipeline import Worker
from worker.simulator import ReplicateSimulator
from worker.store import PostgrestStore, StoreUnavailable, transient
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


def quick_wakeups(supabase: SupabaseEmulator, **options: Any) -> RealtimeWakeups:
    """The worker's Realtime supervisor on the tests' timescale: its health checked every 0.1 s."""
    return RealtimeWakeups(supabase.base_url, supabase.service_role_key, check_seconds=0.1, **options)


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
    wakeups = quick_wakeups(supabase, unhealthy_grace_seconds=1.0, realtime_options={"max_retries": 2, "initial_backoff": 0.1})
    worker, task, http = await start_worker(settings, wakeups)
    try:
        await wait_until(lambda: live(worker), what="the first subscription")
        supabase.refuse_for(3600)  # lifted once the messages are in
        await supabase.drop_connections()
        await wait_until(checking(lambda: not wakeups.live), what="the drop to be noticed")
        messages = [await say(db_url, user, thread, f"sent while Realtime was down ({i})") for i in range(3)]
        # realtime-py's own reconnections are refused until it gives up, and the supervisor rebuilds.
        await wait_until(checking(lambda: supabase.refused >= 1 and wakeups.rebuilds >= 1), 30,
                         "reconnections to be refused and the client rebuilt")
        supabase.refuse_for(0)
        # The periodic sweep is an hour away (worker_settings): the sweep that follows the
        # reconnection answers them.
        runs = await finished_runs(db_url, 3, timeout=30)
        await wait_until(checking(lambda: len(supabase.joins) >= 2 and wakeups.live), 30,
                         "the subscription to be rebuilt")
    finally:
        await stop_worker(worker, task, http)
    assert {r["status"] for r in runs} == {"completed"} and {r["message_id"] for r in runs} == set(messages)
    assert supabase.refused >= 1  # reconnecting was refused for a while, not only dropped
    assert supabase.delivered == 0  # nobody was subscribed when they were written: no change was delivered
    assert wakeups.rebuilds >= 1  # realtime-py gave up within the outage; the supervisor rebuilt it
    assert len(supabase.joins) >= 2


async def test_a_half_open_realtime_connection_is_found_by_its_pings_and_replaced(db_url, simulator, supabase) -> None:
    """A connection that goes silent without closing (a NAT or load balancer forgot it) brings no
    error and no close frame: only unanswered WebSocket pings give it away. The worker's own
    pings (every 5 s, 5 s to answer; shortened here) cut it, and the worker reconnects and
    answers what arrived meanwhile. Without them (ping_interval_seconds=None) only websockets'
    keepalive would, after 20 + 20 + 10 s, past this test's wait (the periodic sweep is an hour
    away)."""
    user, thread = await new_user_thread(db_url)
    settings = supabase_settings(simulator, supabase)
    wakeups = quick_wakeups(supabase, unhealthy_grace_seconds=1.0, ping_interval_seconds=0.2, ping_timeout_seconds=2.0,
                            realtime_options={"initial_backoff": 0.1})
    worker, task, http = await start_worker(settings, wakeups)
    try:
        await wait_until(lambda: live(worker), what="the first subscription")
        supabase.stall_connections()
        message = await say(db_url, user, thread, "sent into a half-open connection")
        [run] = await wait_until(lambda: query(db_url, "select * from assistant_runs where status = 'completed'"),
                                 20, "a reply")
        # The reply may come from the sweep that followed the first subscription, if that sweep
        # ran after the message was written; the silent connection is replaced either way.
        await wait_until(checking(lambda: wakeups.silent_connections >= 1 and len(supabase.joins) >= 2 and wakeups.live),
                         30, "the silent connection to be replaced")
    finally:
        await stop_worker(worker, task, http)
    assert run["status"] == "completed" and run["message_id"] == message
    assert len(supabase.joins) >= 2 and supabase.stalled  # a new connection; the silent one never closed
    assert supabase.delivered == 0  # the change went nowhere: the reconnection's claim found it
    assert wakeups.silent_connections >= 1


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


async def test_a_refused_changes_subscription_is_not_live_and_is_retried_with_backoff(db_url, simulator, supabase) -> None:
    # Realtime answers the join, then says it could not subscribe to the database's changes (as for
    # a table missing from its publication); the channel stays joined but nothing will arrive on it.
    user, thread = await new_user_thread(db_url)
    settings = supabase_settings(simulator, supabase)
    # A grace period longer than the test: only the worker's reaction to the error can rebuild.
    wakeups = quick_wakeups(supabase, unhealthy_grace_seconds=120, max_backoff=2.0)
    worker, task, http = await start_worker(settings, wakeups)
    try:
        await wait_until(lambda: live(worker), what="the first subscription")
        assert await worker.not_ready_because() is None
        await supabase.fail_postgres_changes()
        await wait_until(checking(lambda: not wakeups.live), what="the error to be noticed")
        assert await worker.not_ready_because() == "the wake-up subscription is not live"
        message = await say(db_url, user, thread, "sent while changes could not be subscribed to")
        # Every new subscription is refused as well: three more joins, on the worker's backoff.
        await wait_until(checking(lambda: len(supabase.joins) >= 4), 15, "three more joins")
        assert not wakeups.live
        [queued] = await query(db_url, "select status from assistant_runs where message_id = %s", (message,))
        assert queued["status"] == "queued"  # nothing announced it, and the sweep is an hour away
        supabase.restore_postgres_changes()
        [run] = await finished_runs(db_url, 1, timeout=15)
        assert wakeups.live and await worker.not_ready_because() is None
    finally:
        await stop_worker(worker, task, http)
    assert run["status"] == "completed" and run["message_id"] == message
    assert supabase.delivered == 0  # answered by the sweep that follows the confirmed resubscription
    # Each refused subscription is rebuilt on a fresh connection after 0.5, 1, 2 s: not every
    # second on the same socket, as realtime-py's own rejoin would, without end.
    gaps = [b - a for a, b in zip(supabase.joined_at[1:], supabase.joined_at[2:], strict=False)]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps
    assert wakeups.subscription_errors >= 3


async def test_a_subscription_that_keeps_failing_once_confirmed_is_rebuilt_with_growing_backoff(
        db_url, simulator, supabase) -> None:
    # Realtime confirms each subscription, then reports it failed 0.2 s later, again and again (its
    # change capture crashing and restarting): a confirmation alone does not reset the backoff,
    # or the worker would reconnect twice a second for as long as it lasts.
    settings = supabase_settings(simulator, supabase)
    wakeups = quick_wakeups(supabase, unhealthy_grace_seconds=5, max_backoff=4.0)
    worker, task, http = await start_worker(settings, wakeups)
    try:
        await wait_until(lambda: live(worker), what="the first subscription")
        supabase.flap_postgres_changes(0.2)
        await supabase.drop_connections()
        await wait_until(checking(lambda: len(supabase.joins) >= 5), 20, "four more joins")
    finally:
        await stop_worker(worker, task, http)
    assert wakeups.subscription_errors >= 3
    gaps = [b - a for a, b in zip(supabase.joined_at[2:], supabase.joined_at[3:], strict=False)]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps  # 0.2 s confirmed + 1, then + 2: the delay grows


@pytest.mark.parametrize(("code", "retry"), [
    ("PGRST000", True), ("PGRST001", True), ("503", True), ("502", True), ("08006", True), ("53300", True),
    ("57P01", True), ("40001", True), ("40P01", True),
    # a body that is not PostgREST's carries the HTTP status as its code: a 4xx is no outage
    ("400", False), ("401", False), ("404", False), ("409", False),
    ("40003", False),  # statement completion unknown: it may have been written
    ("42501", False), ("23505", False), ("P0002", False), ("", False),
])
def test_which_postgrest_errors_are_retried(code: str, retry: bool) -> None:
    assert transient(code) is retry


@pytest.mark.parametrize("outage", ["connection_refused", "schema_cache_lost"])
async def test_a_database_outage_behind_postgrest_is_retried_and_the_reply_written_once(db_url, simulator,
                                                                                       supabase, outage) -> None:
    user, thread = await new_user_thread(db_url)
    simulator.latency = 1.0
    worker, task, http = await start_worker(supabase_settings(simulator, supabase))

    def failed_writes() -> list[dict]:
        return [c for c in supabase.rpc_calls if c["fn"] in ("complete_run", "complete_runs") and c.get("status") == 503]

    try:
        await wait_until(lambda: live(worker), what="the subscription")
        message = await say(db_url, user, thread, "answered across an outage")
        await wait_until(checking(lambda: len(simulator.creates) == 1), what="the prediction to start")
        if outage == "connection_refused":
            supabase.cut_database()  # PostgREST can no longer reach the database
        else:
            supabase.lose_schema_cache()  # PostgREST could not load its schema cache, and retries
        async with httpx.AsyncClient() as client:
            refused = await client.post(f"{supabase.base_url}/rest/v1/rpc/run_queue_status", json={},
                                        headers={"apikey": supabase.service_role_key,
                                                 "Authorization": f"Bearer {supabase.service_role_key}"})
        assert refused.status_code == 503
        body = refused.json()
        assert list(body) == ["code", "details", "hint", "message"]
        if outage == "connection_refused":
            assert (body["code"], body["hint"], body["message"]) == ("PGRST000", None, "Database connection error.")
            assert "Connection refused" in body["details"]
        else:
            assert body == {"code": "PGRST002", "details": None, "hint": None,
                            "message": "Could not query the database for the schema cache. Retrying."}
        with pytest.raises(StoreUnavailable):
            await worker.store.queue_status()
        # The prediction ends; writing its reply fails and is tried again while the outage lasts.
        await wait_until(checking(lambda: len(failed_writes()) >= 2), 20, "the reply's write to be retried")
        [in_flight] = await query(db_url, "select status, attempts from assistant_runs where message_id = %s", (message,))
        assert in_flight == {"status": "in_progress", "attempts": 1}
        supabase.restore_database()
        supabase.restore_schema_cache()
        [run] = await finished_runs(db_url, 1, timeout=20)
    finally:
        await stop_worker(worker, task, http)
    assert (run["status"], run["attempts"], run["message_id"]) == ("completed", 1, message)
    [reply] = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert reply["content"] == "You said: answered across an outage"
    assert len(simulator.creates) == 1  # one prediction: the write was retried, not the run
    writes = [c["status"] for c in supabase.rpc_calls if c["fn"] in ("complete_run", "complete_runs")]
    assert writes[-1] == 200 and set(writes[:-1]) == {503}


@pytest.mark.parametrize(("sqlstate", "authed", "message", "status"), [
    ("08006", True, "", 503), ("09000", True, "", 500), ("0L000", True, "", 403), ("0P000", True, "", 403),
    ("23503", True, "", 409), ("23505", True, "", 409), ("25006", True, "", 405), ("25001", True, "", 500),
    ("28000", True, "", 403), ("28P01", True, "", 403), ("2D000", True, "", 500), ("38000", True, "", 500),
    ("39000", True, "", 500), ("3B000", True, "", 500), ("40001", True, "", 500), ("53400", True, "", 500),
    ("53300", True, "", 503), ("54000", True, "", 500), ("55P03", True, "", 500), ("57014", True, "", 500),
    ("57P01", True, "", 503), ("58030", True, "", 500), ("F0000", True, "", 500), ("HV000", True, "", 500),
    ("P0001", True, "", 400), ("P0002", True, "", 500), ("XX000", True, "", 500), ("42883", True, "", 404),
    ("42P01", True, "", 404), ("42P17", True, "", 500), ("42501", True, "", 403), ("42501", False, "", 401),
    ("23502", True, "", 400), ("22023", True, "p_limit must be between 1 and 1000", 400),
    ("22023", True, 'role "nobody" does not exist', 401), ("21000", True, "UPDATE requires a WHERE clause", 400),
    ("21000", True, "more than one row returned by a subquery used as an expression", 500),
    ("PT402", True, "", 402),
])
def test_sqlstates_map_to_postgrest_statuses(sqlstate: str, authed: bool, message: str, status: int) -> None:
    # docs.postgrest.org, Errors: "HTTP Status Codes", and mapSQLtoHTTP in src/PostgREST/Error.hs.
    assert pg_error_status(sqlstate, authed, message) == status


async def test_an_approval_wakes_the_worker_over_realtime(db_url, simulator, supabase) -> None:
    user, thread = await new_user_thread(db_url)
    worker, task, http = await start_worker(supabase_settings(simulator, supabase))
    try:
        await wait_until(lambda: live(worker), what="the subscription")
        await wait_until(lambda: query(db_url, "select 1 from assistant_action_types where name = 'update_profile_preferences'"),
                         what="the action types to be registered")
        [request] = await query(db_url, "insert into assistant_action_requests (user_id, thread_id, action_type, payload)"
                                        " values (%s, %s, 'update_profile_preferences', %s) returning id",
                                (user, thread, Jsonb({"preferences": {"units": "imperial"}})))
        # The sweep interval is an hour: only the Realtime UPDATE can wake the worker now.
        await as_user(db_url, user, "update assistant_action_requests set status = 'approved' where id = %s",
                      (request["id"],))

        async def executed() -> list:
            return await query(db_url, "select status from assistant_action_requests where id = %s and status = 'executed'",
                               (request["id"],))

        await wait_until(executed, what="the approved action to run")
        [binding] = [b for s in supabase.subscriptions for b in s.bindings if b.table == "assistant_action_requests"]
    finally:
        await stop_worker(worker, task, http)
    approval = next(c for c in supabase.changes if c["data"]["table"] == "assistant_action_requests")
    assert approval["topic"] == "realtime:assistant-worker" and approval["ids"] == [binding.id]
    data = approval["data"]
    assert list(data) == ["columns", "commit_timestamp", "errors", "old_record", "record", "schema", "table", "type"]
    assert (data["type"], data["schema"], data["errors"]) == ("UPDATE", "public", None)
    assert data["old_record"] == {"id": str(request["id"])}  # the replica identity: the primary key
    assert data["record"]["status"] == "approved" and data["record"]["id"] == str(request["id"])
    assert {"name": "status", "type": "text"} in data["columns"]


@pytest.mark.parametrize(("sqlstate", "transient"), [
    ("53300", True),   # too many connections
    ("53200", True),   # out of memory
    ("40001", True),   # serialization failure: nothing was written
    ("40P01", True),   # deadlock detected
    ("57P01", True),   # admin shutdown
    ("57014", True),   # statement timeout: cancelled, nothing was written
    ("42501", False),  # permission denied
    ("23505", False),  # unique violation
    ("22023", False),  # invalid parameter
])
async def test_transient_database_errors_behind_postgrest_are_retryable(db_url, supabase, sqlstate, transient) -> None:
    # A function of the test's own raises the SQLSTATE; PostgREST (emulated) answers it as it would.
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("create or replace function public.test_raise(p_code text) returns void language plpgsql"
                           " as $$ begin raise exception 'raised %', p_code using errcode = p_code; end $$")
    options = AsyncClientOptions(auto_refresh_token=False, persist_session=False)
    store = PostgrestStore(await acreate_client(supabase.base_url, supabase.service_role_key, options=options))
    if transient:
        with pytest.raises(StoreUnavailable, match=f"raised {sqlstate}"):
            await store.call("test_raise", {"p_code": sqlstate})
    else:
        with pytest.raises(APIError) as refusal:
            await store.call("test_raise", {"p_code": sqlstate})
        assert refusal.value.code == sqlstate
