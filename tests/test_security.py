"""The security suite beyond the RLS matrices: the callable surface, property-based inserts with
arbitrary content, metadata and URLs, and malformed Realtime frames and Replicate responses."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import psycopg
import psycopg.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import postgrest
from tests.pipeline_helpers import finished_runs, new_user_thread, query, say, wait_until
from tests.postgrest import create_user, request
from tests.replicate_stub import ReplicateStub
from tests.supabase_emulator import SupabaseEmulator
from tests.test_supabase_transport import start_worker, stop_worker, supabase_settings
from worker.app import replicate_http
from worker.config import DEFAULT_CHAT_MODEL, Settings
from worker.localdb import LocalDatabase
from worker.provider import ProviderError, ReplicateClient

# What app clients may execute; everything else in `public` is service-only. Pure helpers and
# trigger functions are listed so that a new function has to be placed deliberately.
CLIENT_FUNCTIONS = {
    "my_ai_usage", "my_replicate_token_status", "set_my_replicate_token", "cancel_run",  # the client API
    "default_assistant_id",  # the column default of assistant_threads.assistant_id
    "ai_refusal_text", "ai_window_start", "ai_window_end", "assistant_failure_text", "assistant_is_client",  # pure
}
TRIGGER_ONLY = "trigger"


def test_clients_can_execute_only_the_client_api(conn: psycopg.Connection) -> None:
    callable_by_clients = {
        name for name, returns in conn.execute(
            "select p.proname, p.prorettype::regtype::text from pg_proc p where p.pronamespace = 'public'::regnamespace"
            " and (has_function_privilege('anon', p.oid, 'execute') or has_function_privilege('authenticated', p.oid, 'execute'))")
        if returns != TRIGGER_ONLY}
    assert callable_by_clients == CLIENT_FUNCTIONS
    anon_callable = {r[0] for r in conn.execute(
        "select p.proname from pg_proc p where p.pronamespace = 'public'::regnamespace"
        " and has_function_privilege('anon', p.oid, 'execute') and p.prorettype <> 'trigger'::regtype")}
    assert not anon_callable & {"my_ai_usage", "my_replicate_token_status", "set_my_replicate_token"}


def test_trigger_functions_cannot_be_called_directly(conn: psycopg.Connection, owner) -> None:
    with request(conn, postgrest.user("o", owner)) as cur, pytest.raises(psycopg.errors.FeatureNotSupported):
        cur.execute("select assistant_messages_guard_insert()")


def test_no_client_role_can_write_any_table_without_rls(conn: psycopg.Connection) -> None:
    # A view that runs as its caller (security_invoker) reads its tables under their own RLS, which
    # this same query checks; any other view would read them as its owner.
    exposed = conn.execute("""
        select c.relname from pg_class c
         where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'v', 'm', 'p')
           and (has_table_privilege('anon', c.oid, 'select,insert,update,delete')
                or (not c.relrowsecurity
                    and not (c.relkind = 'v' and 'security_invoker=true' = any(coalesce(c.reloptions, '{}')))
                    and has_table_privilege('authenticated', c.oid, 'select,insert,update,delete')))
    """).fetchall()
    assert exposed == []


# -- property-based: whatever a client sends, the database either stores exactly that as a user
# message (with its run) or refuses it with a reason; it never errors otherwise ---------------------
@pytest.fixture(scope="module")
def fuzz_world(cluster: LocalDatabase, template_db: str) -> Iterator[tuple[psycopg.Connection, uuid.UUID, uuid.UUID]]:
    url = cluster.create_database("fuzz_world", template=template_db)
    with psycopg.connect(url, autocommit=True) as conn:
        user = create_user(conn)
        thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
        yield conn, user, thread


REFUSALS = (psycopg.errors.CheckViolation, psycopg.errors.InsufficientPrivilege, psycopg.errors.UntranslatableCharacter,
            psycopg.errors.InvalidTextRepresentation)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                           max_leaves=30)
urls = st.one_of(st.none(), st.text(max_size=100),
                 st.builds(lambda scheme, rest: f"{scheme}{rest}",
                           st.sampled_from(["https://", "http://", "storage://", "ftp://", "javascript:", "data:", "file://"]),
                           st.text(max_size=80)))
roles = st.sampled_from(["user", "assistant", "system", "tool", "admin", "", "USER"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.text(max_size=9000), metadata=json_values, image_url=urls, role=roles)
def test_arbitrary_client_inserts_are_stored_exactly_or_refused(fuzz_world, content, metadata, image_url, role) -> None:
    conn, user, thread = fuzz_world
    if "\x00" in content + json.dumps(metadata) + (image_url or ""):
        return  # PostgreSQL text cannot hold NUL; the client library refuses before sending
    with request(conn, postgrest.user("u", user)) as cur:
        try:
            with conn.transaction():
                row = cur.execute(
                    "insert into assistant_messages (thread_id, role, content, metadata_json, image_url)"
                    " values (%s, %s, %s, %s, %s)"
                    " returning role, content, metadata_json = %s::jsonb, image_url, id",
                    (thread, role, content, json.dumps(metadata), image_url, json.dumps(metadata))).fetchone()
        except REFUSALS as refusal:
            assert refusal.diag.message_primary  # every refusal says why
            return
        assert row[0] == "user" and role == "user"
        assert row[1] == content and row[2] is True and row[3] == image_url  # jsonb equality: numbers as numbers
        assert 1 <= len(content) <= 8000 and isinstance(metadata, dict)
        assert image_url is None or image_url.startswith(("https://", "storage://"))
        assert cur.execute("select status from assistant_runs where message_id = %s", (row[4],)).fetchone() == ("queued",)


# -- malformed provider answers never escape as anything but a ProviderError ---------------------
prediction_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"id": st.text(max_size=10) | st.integers(), "status": st.sampled_from(
        ["starting", "processing", "succeeded", "failed", "canceled", "weird", ""]) | st.integers(),
        "output": json_values, "metrics": json_values, "error": json_values}))


@settings(max_examples=80, deadline=None)
@given(status=st.sampled_from([200, 201, 202, 400, 401, 402, 404, 409, 422, 429, 500, 502, 503]),
       body=prediction_bodies, retry_after=st.one_of(st.none(), st.text(max_size=12)))
def test_malformed_replicate_answers_become_error_codes(status, body, retry_after) -> None:
    async def scenario() -> None:
        headers = {"Retry-After": retry_after} if retry_after and retry_after.isascii() and retry_after.isprintable() else {}
        async with ReplicateStub() as stub:
            s = Settings(replicate_api_token="r8_test", replicate_base_url=stub.base_url,
                         replicate_max_http_retries=0, prediction_timeout_seconds=0.05, replicate_max_creates_per_minute=0)
            stub.post(r".*/predictions").respond(status, json=body, headers=headers)
            stub.get(r"/v1/predictions/.*").respond(status, json=body)
            stub.post(r".*/cancel").respond(200, json={})
            async with replicate_http(s) as http:
                try:
                    result = await ReplicateClient(http, s).predict(DEFAULT_CHAT_MODEL, {"prompt": "hi"})
                except ProviderError as error:
                    assert error.code and error.message
                    return
        assert isinstance(result.text, str) and result.text.strip()

    asyncio.run(scenario())


# -- malformed Realtime frames never crash the worker ------------------------------------------
GARBAGE_FRAMES = [
    "not json at all", "[]", "null", '{"event": "postgres_changes"}',
    '{"event": "postgres_changes", "topic": "realtime:assistant-worker", "ref": null, "payload": {"ids": ["x"], "data": 5}}',
    '{"event": "postgres_changes", "topic": "realtime:assistant-worker", "ref": null, "payload": {"data": {"type": "INSERT"}}}',
    '{"event": "system", "topic": "realtime:assistant-worker", "ref": null, "payload": {"status": "ok"}}',
    '{"event": "phx_reply", "topic": "realtime:unknown", "ref": "999", "payload": {"status": "ok", "response": {}}}',
    '{"event": "presence_diff", "topic": "realtime:assistant-worker", "ref": null, "payload": {"joins": 1}}',
    '{"event": "' + "x" * 10000 + '", "topic": "phoenix", "ref": null, "payload": {}}',
]


async def test_malformed_realtime_frames_do_not_crash_the_worker(db_url, simulator) -> None:
    emulator = SupabaseEmulator(db_url)
    await emulator.start()
    user, thread = await new_user_thread(db_url)
    worker, task, http = await start_worker(supabase_settings(simulator, emulator))
    try:
        await wait_until(lambda: live(worker), what="the subscription")
        for frame in GARBAGE_FRAMES:
            for socket in list(emulator.sockets):
                await socket.send_str(frame)
        await say(db_url, user, thread, "still there?")
        [run] = await finished_runs(db_url, 1, timeout=30)
        assert not task.done()  # the worker is still running
    finally:
        await stop_worker(worker, task, http)
        await emulator.stop()
    assert run["status"] == "completed"
    assert (await query(db_url, "select count(*) as n from assistant_messages where role = 'assistant'"))[0]["n"] == 1


async def live(worker) -> bool:
    return worker.wakeups.live
