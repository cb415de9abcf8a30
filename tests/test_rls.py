"""Row Level Security, acting exactly as PostgREST does: for each table x operation x actor, the
outcome on the owner's rows. Then the rules a client might try to get around, one by one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import psycopg.errors
import pytest

from tests import postgrest
from tests.postgrest import Actor, create_user, request
from worker.localdb import LocalDatabase

DENIED = "denied"  # the statement fails with SQLSTATE 42501 (permission / RLS refusal)


@dataclass
class World:
    conn: psycopg.Connection
    owner: uuid.UUID
    other: uuid.UUID
    thread: uuid.UUID
    message: uuid.UUID  # the owner's user message
    reply: uuid.UUID  # the assistant's reply to it
    run: uuid.UUID
    event: uuid.UUID

    def actor(self, name: str) -> Actor:
        return {
            "owner": postgrest.user("owner", self.owner),
            "other": postgrest.user("other", self.other),
            "anon": postgrest.anon(),
            "service": postgrest.service(),
        }[name]

    @property
    def params(self) -> dict[str, uuid.UUID]:
        return {k: getattr(self, k) for k in ("owner", "other", "thread", "message", "reply", "run", "event")}


def build_world(conn: psycopg.Connection) -> World:
    owner, other = create_user(conn, email="owner@example.com"), create_user(conn, email="other@example.com")
    with request(conn, postgrest.user("owner", owner), commit=True) as cur:
        thread = cur.execute("insert into assistant_threads (title) values ('Outfits') returning id").fetchone()[0]
        message = cur.execute(
            "insert into assistant_messages (thread_id, role, content) values (%s, 'user', 'What goes with navy?') returning id",
            (thread,)).fetchone()[0]
    with request(conn, postgrest.service(), commit=True) as cur:
        reply = cur.execute(
            "insert into assistant_messages (thread_id, role, content, reply_to, model, token_count, latency_ms)"
            " values (%s, 'assistant', 'Camel and white.', %s, 'meta/meta-llama-3-8b-instruct', 5, 120) returning id",
            (thread, message)).fetchone()[0]
        run = cur.execute("select id from assistant_runs where message_id = %s", (message,)).fetchone()[0]
        event = cur.execute(
            "insert into assistant_inference_events (user_id, thread_id, message_id, run_id, provider, model, status)"
            " values (%s, %s, %s, %s, 'replicate', 'meta/meta-llama-3-8b-instruct', 'succeeded') returning id",
            (owner, thread, message, run)).fetchone()[0]
    return World(conn, owner, other, thread, message, reply, run, event)


@pytest.fixture(scope="module")
def world(cluster: LocalDatabase, template_db: str) -> Iterator[World]:
    url = cluster.create_database("rls_world", template=template_db)
    with psycopg.connect(url, autocommit=True) as conn:
        yield build_world(conn)


OPERATIONS: dict[tuple[str, str], str] = {
    ("assistant_threads", "select"): "select * from assistant_threads where id = %(thread)s",
    ("assistant_threads", "insert"): "insert into assistant_threads (user_id, title) values (%(owner)s, 'New')",
    ("assistant_threads", "update"): "update assistant_threads set title = 'Renamed' where id = %(thread)s",
    ("assistant_threads", "delete"): "delete from assistant_threads where id = %(thread)s",
    ("assistant_messages", "select"): "select * from assistant_messages where id = %(message)s",
    ("assistant_messages", "insert"):
        "insert into assistant_messages (thread_id, user_id, role, content) values (%(thread)s, %(owner)s, 'user', 'And shoes?')",
    ("assistant_messages", "update"): "update assistant_messages set content = 'edited' where id = %(message)s",
    ("assistant_messages", "delete"): "delete from assistant_messages where id = %(message)s",
    ("assistant_runs", "select"): "select * from assistant_runs where id = %(run)s",
    ("assistant_runs", "insert"):
        "insert into assistant_runs (message_id, thread_id, user_id) values (%(reply)s, %(thread)s, %(owner)s)",
    ("assistant_runs", "update"): "update assistant_runs set status = 'cancelled' where id = %(run)s",
    ("assistant_runs", "delete"): "delete from assistant_runs where id = %(run)s",
    ("assistant_inference_events", "select"): "select * from assistant_inference_events where id = %(event)s",
    ("assistant_inference_events", "insert"):
        "insert into assistant_inference_events (user_id, provider, model, status)"
        " values (%(owner)s, 'replicate', 'm', 'succeeded')",
    ("assistant_inference_events", "update"):
        "update assistant_inference_events set cost_estimate_usd = 0 where id = %(event)s",
    ("assistant_inference_events", "delete"): "delete from assistant_inference_events where id = %(event)s",
}

# Rows seen or changed, or DENIED. "other" is a second signed-in user acting on the owner's rows.
EXPECTED: dict[tuple[str, str], dict[str, int | str]] = {
    ("assistant_threads", "select"): {"owner": 1, "other": 0, "anon": DENIED, "service": 1},
    ("assistant_threads", "insert"): {"owner": 1, "other": DENIED, "anon": DENIED, "service": 1},
    ("assistant_threads", "update"): {"owner": 1, "other": 0, "anon": DENIED, "service": 1},
    ("assistant_threads", "delete"): {"owner": 1, "other": 0, "anon": DENIED, "service": 1},
    ("assistant_messages", "select"): {"owner": 1, "other": 0, "anon": DENIED, "service": 1},
    ("assistant_messages", "insert"): {"owner": 1, "other": DENIED, "anon": DENIED, "service": 1},
    ("assistant_messages", "update"): {"owner": DENIED, "other": DENIED, "anon": DENIED, "service": 1},
    ("assistant_messages", "delete"): {"owner": 1, "other": 0, "anon": DENIED, "service": 1},
    ("assistant_runs", "select"): {"owner": 1, "other": 0, "anon": DENIED, "service": 1},
    ("assistant_runs", "insert"): {"owner": DENIED, "other": DENIED, "anon": DENIED, "service": 1},
    ("assistant_runs", "update"): {"owner": DENIED, "other": DENIED, "anon": DENIED, "service": 1},
    ("assistant_runs", "delete"): {"owner": DENIED, "other": DENIED, "anon": DENIED, "service": 1},
    ("assistant_inference_events", "select"): {"owner": 1, "other": 0, "anon": DENIED, "service": 1},
    ("assistant_inference_events", "insert"): {"owner": DENIED, "other": DENIED, "anon": DENIED, "service": 1},
    ("assistant_inference_events", "update"): {"owner": DENIED, "other": DENIED, "anon": DENIED, "service": 1},
    ("assistant_inference_events", "delete"): {"owner": DENIED, "other": DENIED, "anon": DENIED, "service": 1},
}

CELLS = [(table, op, actor, outcome) for (table, op), row in EXPECTED.items() for actor, outcome in row.items()]


def test_matrix_covers_every_public_table(world: World) -> None:
    """Every table in `public` is in one of the RLS matrices (here, usage, assistants)."""
    from tests import test_rls_assistants, test_usage_rls

    tables = {r[0] for r in world.conn.execute(
        "select relname from pg_class where relnamespace = 'public'::regnamespace and relkind in ('r', 'p')")}
    covered = {table for table, _ in EXPECTED} | test_usage_rls.TABLES_COVERED | test_rls_assistants.TABLES_COVERED
    assert tables - covered == set()
    assert set(OPERATIONS) == set(EXPECTED)


@pytest.mark.parametrize(("table", "op", "actor", "expected"), CELLS,
                         ids=[f"{t}-{o}-{a}" for t, o, a, _ in CELLS])
def test_rls_matrix(world: World, table: str, op: str, actor: str, expected: int | str) -> None:
    with request(world.conn, world.actor(actor)) as cur:
        if expected == DENIED:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                cur.execute(OPERATIONS[table, op], world.params)
            return
        cur.execute(OPERATIONS[table, op], world.params)
        affected = len(cur.fetchall()) if op == "select" else cur.rowcount
    assert affected == expected


def _refused(world: World, actor: Actor, sql: str, params: dict | tuple, reason: str) -> None:
    with request(world.conn, actor) as cur:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refusal:
            cur.execute(sql, params)
    assert reason in str(refusal.value), str(refusal.value)


@pytest.mark.parametrize("role", ["assistant", "system", "tool"])
def test_users_cannot_forge_server_messages(world: World, role: str) -> None:
    _refused(world, world.actor("owner"),
             "insert into assistant_messages (thread_id, role, content) values (%s, %s, 'forged')",
             (world.thread, role), "clients may only write messages with role 'user'")


@pytest.mark.parametrize("column", ["reply_to", "model", "token_count", "latency_ms"])
def test_users_cannot_write_a_reply_link_or_reply_numbers(world: World, column: str) -> None:
    value = {"reply_to": world.message, "model": "gpt", "token_count": 1, "latency_ms": 1}[column]
    _refused(world, world.actor("owner"),
             f"insert into assistant_messages (thread_id, role, content, {column}) values (%s, 'user', 'x', %s)",
             (world.thread, value), "reply_to, token_count, model and latency_ms are set by the server")


def test_users_cannot_write_into_another_users_thread(world: World) -> None:
    for user_id in (world.other, world.owner):
        _refused(world, world.actor("other"),
                 "insert into assistant_messages (thread_id, user_id, role, content) values (%s, %s, 'user', 'hi')",
                 (world.thread, user_id), "")


def test_users_cannot_write_messages_under_another_user_id(world: World) -> None:
    _refused(world, world.actor("owner"),
             "insert into assistant_messages (thread_id, user_id, role, content) values (%s, %s, 'user', 'hi')",
             (world.thread, world.other), "user_id must be your own user id")


def test_users_cannot_create_threads_for_others(world: World) -> None:
    _refused(world, world.actor("owner"),
             "insert into assistant_threads (user_id, title) values (%s, 'yours')", (world.other,),
             "row-level security")


def test_users_cannot_give_a_thread_away_or_touch_server_columns(world: World) -> None:
    for assignment in ("user_id = %(other)s", "last_message_at = now() - interval '1 day'", "created_at = now()"):
        _refused(world, world.actor("owner"),
                 f"update assistant_threads set {assignment} where id = %(thread)s", world.params,
                 "only the title, archived_at and assistant_id of a thread can be changed")


def test_archived_threads_take_no_new_messages(world: World) -> None:
    with request(world.conn, world.actor("owner")) as cur:
        cur.execute("update assistant_threads set archived_at = now() where id = %s", (world.thread,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is archived"):
            cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'user', 'hi')",
                        (world.thread,))


def test_rls_alone_refuses_forged_messages(world: World) -> None:
    """Defence in depth: with the explanatory trigger disabled, the policy still refuses."""
    with world.conn.transaction(force_rollback=True):
        world.conn.execute("alter table assistant_messages disable trigger assistant_messages_guard_insert")
        world.conn.execute("set local role authenticated")
        world.conn.execute("select set_config('request.jwt.claims', %s, true)",
                           (f'{{"sub":"{world.owner}","role":"authenticated"}}',))
        for role, thread, user_id in [("assistant", world.thread, world.owner),
                                      ("user", world.thread, world.other)]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                with world.conn.transaction():  # a savepoint per attempt, rolled back on refusal
                    world.conn.execute(
                        "insert into assistant_messages (thread_id, user_id, role, content) values (%s, %s, %s, 'x')",
                        (thread, user_id, role))


def test_client_timestamps_are_the_servers(world: World) -> None:
    with request(world.conn, world.actor("owner")) as cur:
        created_at, now = cur.execute(
            "insert into assistant_messages (thread_id, role, content, created_at)"
            " values (%s, 'user', 'backdated?', now() - interval '1 year') returning created_at, now()",
            (world.thread,)).fetchone()
    assert created_at == now


def test_guests_are_signed_in_users_too(world: World) -> None:
    guest = create_user(world.conn, is_anonymous=True)
    with request(world.conn, postgrest.user("guest", guest, is_anonymous=True)) as cur:
        thread = cur.execute("insert into assistant_threads default values returning id").fetchone()[0]
        cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'user', 'hi')", (thread,))
        assert cur.execute("select count(*) from assistant_messages").fetchone()[0] == 1
        assert cur.execute("select count(*) from assistant_runs").fetchone()[0] == 1


def test_every_public_table_has_rls_and_policies_follow_supabase_advice(world: World) -> None:
    without_rls = [r[0] for r in world.conn.execute(
        "select relname from pg_class where relnamespace = 'public'::regnamespace and relkind = 'r' and not relrowsecurity")]
    assert without_rls == []
    for name, roles, qual, check in world.conn.execute(
            "select policyname, roles::text[], qual, with_check from pg_policies where schemaname = 'public'"):
        assert roles == ["authenticated"] or "service_role" in roles, f"{name} is not scoped to a role"
        for expression in (qual, check):
            if expression and "auth.uid()" in expression:
                assert expression.count("auth.uid()") == expression.count("SELECT auth.uid()"), \
                    f"{name} calls auth.uid() per row: {expression}"


def test_policy_columns_are_indexed(world: World) -> None:
    """Every table with a user_id policy has an index led by user_id."""
    unindexed = [r[0] for r in world.conn.execute("""
        select distinct p.tablename from pg_policies p
         where p.schemaname = 'public' and coalesce(p.qual, p.with_check) like '%user_id%'
           and not exists (
             select 1 from pg_index i
               join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
              where i.indrelid = format('%I.%I', p.schemaname, p.tablename)::regclass and a.attname = 'user_id')
    """)]
    assert unindexed == []
