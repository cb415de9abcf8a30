"""RLS and refusals for plans, settings, usage, BYOK tokens, reports and feedback, acting as
PostgREST does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import psycopg.errors
import pytest

from tests import postgrest
from tests.postgrest import create_user, request
from worker.localdb import LocalDatabase

TOKEN = "r8_Abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class World:
    conn: psycopg.Connection
    owner: uuid.UUID
    other: uuid.UUID
    thread: uuid.UUID
    message: uuid.UUID
    reply: uuid.UUID
    feedback: uuid.UUID

    def actor(self, name: str) -> postgrest.Actor:
        return {"owner": postgrest.user("owner", self.owner), "other": postgrest.user("other", self.other),
                "anon": postgrest.anon(), "service": postgrest.service()}[name]


@pytest.fixture(scope="module")
def world(cluster: LocalDatabase, template_db: str) -> Iterator[World]:
    url = cluster.create_database("usage_rls_world", template=template_db)
    with psycopg.connect(url, autocommit=True) as conn:
        owner, other = create_user(conn, plan=None), create_user(conn, plan=None)
        thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (owner,)).fetchone()[0]
        with request(conn, postgrest.user("owner", owner), commit=True) as cur:
            message = cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'user', 'q')"
                                  " returning id", (thread,)).fetchone()[0]
        reply = conn.execute("insert into assistant_messages (thread_id, role, content, reply_to) values (%s, 'assistant', 'a', %s)"
                             " returning id", (thread, message)).fetchone()[0]
        conn.execute("select admit_request(%s, false)", (owner,))
        with request(conn, postgrest.user("owner", owner), commit=True) as cur:
            feedback = cur.execute("insert into ai_feedback (message_id, rating) values (%s, 1) returning id",
                                   (reply,)).fetchone()[0]
            cur.execute("select set_my_replicate_token(%s)", (TOKEN,))
        yield World(conn, owner, other, thread, message, reply, feedback)


def rows(world: World, actor: str, sql: str, params: tuple = ()) -> int | str:
    """Rows seen or changed, 'denied', or 'read-only view'."""
    with request(world.conn, world.actor(actor)) as cur:
        try:
            cur.execute(sql, params)
        except psycopg.errors.InsufficientPrivilege:
            return "denied"
        except psycopg.errors.ObjectNotInPrerequisiteState as exc:
            assert "cannot update view" in str(exc)
            return "read-only view"
        return len(cur.fetchall()) if cur.description and sql.lstrip().startswith("select") else cur.rowcount


CASES = [
    # (sql, params-from-world, owner, other, anon, service)
    ("select * from ai_plans", (), 5, 5, "denied", 5),
    ("update ai_plans set uses_own_key = true where id = 'free'", (), "denied", "denied", "denied", 1),
    ("select * from ai_plan_limits where plan_id = 'free'", (), 3, 3, "denied", 3),
    ("update ai_plan_limits set limit_value = 1000 where plan_id = 'free'", (), "denied", "denied", "denied", 3),
    ("select * from user_ai_settings where user_id = %(owner)s", (), 1, 0, "denied", 1),
    ("update user_ai_settings set preferred_chat_model = 'meta/meta-llama-3-70b-instruct' where user_id = %(owner)s",
     (), 1, 0, "denied", 1),
    ("insert into user_ai_settings (user_id) values (%(other)s)", (), "denied", "denied", "denied", "unique"),
    ("delete from user_ai_settings where user_id = %(owner)s", (), "denied", "denied", "denied", 1),
    ("update user_ai_settings set user_id = %(other)s where user_id = %(owner)s", (), "denied", 0, "denied", "unique"),
    # admission counted messages and requests in 4 windows: 4 rows of ai_usage_windows, 8 counters used
    ("select * from ai_usage_windows where user_id = %(owner)s", (), 4, 0, "denied", 4),
    ("select * from ai_usage_counters where user_id = %(owner)s", (), 8, 0, "denied", 8),
    ("update ai_usage_windows set messages = 0 where user_id = %(owner)s", (), "denied", "denied", "denied", 4),
    ("insert into ai_usage_windows (user_id, time_window, window_start) values (%(owner)s, 'day', now())",
     (), "denied", "denied", "denied", 1),
    # the counters are a view that nobody writes (the service role counts with ai_usage_add)
    ("update ai_usage_counters set used = 0 where user_id = %(owner)s", (), "read-only view", "read-only view",
     "read-only view", "read-only view"),
    ("select * from user_replicate_tokens", (), "denied", "denied", "denied", 1),
    ("select * from ai_feedback where id = %(feedback)s", (), 1, 0, "denied", 1),
    ("update ai_feedback set rating = -1 where id = %(feedback)s", (), 1, 0, "denied", 1),
    ("delete from ai_feedback where id = %(feedback)s", (), 1, 0, "denied", 1),
    ("update ai_feedback set user_id = %(other)s where id = %(feedback)s", (), "denied", 0, "denied", 1),
    ("select * from ai_usage_daily", (), "denied", "denied", "denied", 0),
    ("select * from ai_usage_monthly", (), "denied", "denied", "denied", 0),
    ("select * from ai_usage_today", (), "denied", "denied", "denied", 0),
    ("select * from ai_feedback_summary", (), "denied", "denied", "denied", 1),
]


TABLES_COVERED = {"ai_plans", "ai_plan_limits", "user_ai_settings", "ai_usage_windows", "ai_usage_counters",
                  "user_replicate_tokens", "ai_feedback"}


@pytest.mark.parametrize("case", CASES, ids=[c[0][:60] for c in CASES])
def test_usage_tables_rls(world: World, case: tuple) -> None:
    sql, _, *expected = case
    params = {"owner": world.owner, "other": world.other, "feedback": world.feedback}
    for actor, outcome in zip(("owner", "other", "anon", "service"), expected, strict=True):
        if outcome == "unique":
            with request(world.conn, world.actor(actor)) as cur, pytest.raises(psycopg.errors.UniqueViolation):
                cur.execute(sql, params)
            continue
        assert rows(world, actor, sql, params) == outcome, actor


def _refused(world: World, actor: str, sql: str, params: tuple | dict, reason: str,
             error: type[Exception] = psycopg.errors.InsufficientPrivilege) -> None:
    with request(world.conn, world.actor(actor)) as cur, pytest.raises(error) as refusal:
        cur.execute(sql, params)
    assert reason in str(refusal.value), str(refusal.value)


def test_a_user_cannot_raise_their_plan(world: World) -> None:
    _refused(world, "owner", "update user_ai_settings set plan_id = 'premium' where user_id = %s", (world.owner,),
             "only your model preferences can be changed")


@pytest.mark.parametrize("function", [
    "admit_request(%(owner)s, false)", "ai_usage_add(%(owner)s, '{}')", "get_replicate_token(%(owner)s)",
    "store_encrypted_replicate_token(%(owner)s, 1, 'x')", "pending_replicate_tokens()", "refresh_ai_usage_reports()",
    "ai_plan_of(%(owner)s)",
])
@pytest.mark.parametrize("actor", ["owner", "anon"])
def test_clients_cannot_call_service_functions(world: World, function: str, actor: str) -> None:
    _refused(world, actor, f"select {function}", {"owner": world.owner}, "permission denied for function")


def test_nobody_reads_a_byok_token_back(world: World) -> None:
    with request(world.conn, world.actor("owner")) as cur:
        status = cur.execute("select my_replicate_token_status()").fetchone()[0]
    assert status["token_set"] is True and status["token_hint"] == "…" + TOKEN[-4:]
    assert TOKEN not in str(status)
    _refused(world, "owner", "select pending_token from user_replicate_tokens", (), "permission denied")
    with request(world.conn, world.actor("other")) as cur:
        assert cur.execute("select my_replicate_token_status()").fetchone()[0] == {"token_set": False}


def test_setting_a_bad_token_is_refused_with_a_reason(world: World) -> None:
    _refused(world, "owner", "select set_my_replicate_token('not a token!')", (),
             "that does not look like a Replicate API token", psycopg.errors.InvalidParameterValue)
    _refused(world, "anon", "select set_my_replicate_token(%s)", (TOKEN,), "permission denied for function")


def test_clearing_the_token(world: World) -> None:
    with request(world.conn, world.actor("owner")) as cur:
        assert cur.execute("select set_my_replicate_token(null)").fetchone()[0] == {"token_set": False}
        assert cur.execute("select my_replicate_token_status()").fetchone()[0] == {"token_set": False}


# -- feedback ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rating", [0, 2, -2])
def test_rating_is_plus_or_minus_one(world: World, rating: int) -> None:
    _refused(world, "owner", "update ai_feedback set rating = %s where id = %s", (rating, world.feedback),
             "ai_feedback_rating_is_plus_or_minus_one", psycopg.errors.CheckViolation)


def test_comment_of_at_most_5000_chars(world: World) -> None:
    with request(world.conn, world.actor("owner")) as cur:
        cur.execute("update ai_feedback set comment = %s where id = %s", ("c" * 5000, world.feedback))
    _refused(world, "owner", "update ai_feedback set comment = %s where id = %s", ("c" * 5001, world.feedback),
             "ai_feedback_comment_at_most_5000_chars", psycopg.errors.CheckViolation)


def test_one_feedback_per_user_and_message(world: World) -> None:
    _refused(world, "owner", "insert into ai_feedback (message_id, rating) values (%s, -1)", (world.reply,),
             "ai_feedback_one_per_user_and_message", psycopg.errors.UniqueViolation)


def test_feedback_only_on_replies_in_ones_own_threads(world: World) -> None:
    _refused(world, "owner", "insert into ai_feedback (message_id, rating) values (%s, 1)", (world.message,),
             "feedback can only be given on an assistant reply in your own threads")
    _refused(world, "other", "insert into ai_feedback (message_id, rating) values (%s, 1)", (world.reply,),
             "feedback can only be given on an assistant reply in your own threads")
    _refused(world, "other", "insert into ai_feedback (user_id, message_id, rating) values (%s, %s, 1)",
             (world.owner, world.reply), "feedback is given in your own name")


def test_feedback_author_changes_rating_but_not_its_target(world: World) -> None:
    with request(world.conn, world.actor("owner")) as cur:
        assert cur.execute("update ai_feedback set rating = -1, comment = 'too vague' where id = %s",
                           (world.feedback,)).rowcount == 1
    _refused(world, "owner", "update ai_feedback set message_id = %s where id = %s", (world.message, world.feedback),
             "only the rating and comment of feedback can be changed")
