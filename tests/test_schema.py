"""Check constraints refuse bad rows with an error that names the rule; triggers keep the derived
columns and the run rows right."""

from __future__ import annotations

import uuid

import psycopg
import psycopg.errors
import pytest

from tests import postgrest
from tests.conftest import user_message
from tests.postgrest import create_user, request


def reply(conn: psycopg.Connection, thread: uuid.UUID, to: uuid.UUID, content: str = "hi") -> uuid.UUID:
    return conn.execute(
        "insert into assistant_messages (thread_id, role, content, reply_to) values (%s, 'assistant', %s, %s) returning id",
        (thread, content, to)).fetchone()[0]


@pytest.mark.parametrize("length", [0, 8001])
def test_content_outside_1_to_8000_chars_is_refused(conn, owner, thread, length: int) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="assistant_messages_content_between_1_and_8000_chars"):
        user_message(conn, owner, thread, "x" * length)


@pytest.mark.parametrize("length", [1, 8000])
def test_content_at_the_bounds_is_accepted(conn, owner, thread, length: int) -> None:
    user_message(conn, owner, thread, "x" * length)


def test_title_of_121_chars_is_refused(conn, owner) -> None:
    with request(conn, postgrest.user("owner", owner)) as cur:
        cur.execute("insert into assistant_threads (title) values (%s)", ("t" * 120,))
        with pytest.raises(psycopg.errors.CheckViolation, match="assistant_threads_title_at_most_120_chars"):
            cur.execute("insert into assistant_threads (title) values (%s)", ("t" * 121,))


def test_unknown_role_is_refused(conn, thread) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="assistant_messages_role_is_user_assistant_system_or_tool"):
        conn.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'moderator', 'x')", (thread,))


def test_a_message_gets_one_reply_only(conn, owner, thread) -> None:
    message = user_message(conn, owner, thread)
    reply(conn, thread, message)
    with pytest.raises(psycopg.errors.UniqueViolation, match="assistant_messages_reply_to_key"):
        reply(conn, thread, message, "a second answer")


def test_a_reply_stays_in_its_thread(conn, owner, thread) -> None:
    message = user_message(conn, owner, thread)
    elsewhere = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (owner,)).fetchone()[0]
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="assistant_messages_reply_to_same_thread"):
        reply(conn, elsewhere, message)


def test_only_assistant_messages_reply(conn, owner, thread) -> None:
    message = user_message(conn, owner, thread)
    with pytest.raises(psycopg.errors.CheckViolation, match="assistant_messages_only_assistant_messages_reply"):
        conn.execute("insert into assistant_messages (thread_id, role, content, reply_to) values (%s, 'tool', 'x', %s)",
                     (thread, message))


@pytest.mark.parametrize(("column", "value", "constraint"), [
    ("metadata_json", "[]", "assistant_messages_metadata_json_is_object_of_at_most_16kb"),
    ("image_url", "", "assistant_messages_image_url_between_1_and_2048_chars"),
    ("image_url", "https://e.x/" + "a" * 2040, "assistant_messages_image_url_between_1_and_2048_chars"),
    ("token_count", "-1", "assistant_messages_token_count_not_negative"),
    ("latency_ms", "-5", "assistant_messages_latency_ms_not_negative"),
])
def test_message_column_checks(conn, thread, column: str, value: str, constraint: str) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
        conn.execute(f"insert into assistant_messages (thread_id, role, content, {column}) values (%s, 'assistant', 'x', %s)",
                     (thread, value))


def test_metadata_over_16kb_is_refused(conn, thread) -> None:
    big = '{"notes": "%s"}' % "".join(uuid.uuid4().hex for _ in range(700))  # incompressible, > 16 kB
    with pytest.raises(psycopg.errors.CheckViolation, match="assistant_messages_metadata_json_is_object_of_at_most_16kb"):
        conn.execute("insert into assistant_messages (thread_id, role, content, metadata_json) values (%s, 'assistant', 'x', %s)",
                     (thread, big))


def test_server_messages_take_their_owner_from_the_thread(conn, owner, thread) -> None:
    message = user_message(conn, owner, thread)
    answer = reply(conn, thread, message)
    assert conn.execute("select user_id from assistant_messages where id = %s", (answer,)).fetchone()[0] == owner
    stranger = create_user(conn)
    with pytest.raises(psycopg.errors.CheckViolation, match="owner of its thread"):
        conn.execute("insert into assistant_messages (thread_id, user_id, role, content) values (%s, %s, 'assistant', 'x')",
                     (thread, stranger))


@pytest.mark.parametrize(("sql", "constraint"), [
    ("insert into assistant_inference_events (user_id, provider, model, status) values (%(u)s, 'replicate', 'm', 'done')",
     "assistant_inference_events_status_known"),
    ("insert into assistant_inference_events (user_id, provider, model, status, output_tokens) values (%(u)s, 'replicate', 'm', 'failed', -1)",
     "assistant_inference_events_counts_not_negative"),
    ("insert into assistant_inference_events (user_id, provider, model, status, attempt) values (%(u)s, 'replicate', 'm', 'failed', 0)",
     "assistant_inference_events_attempt_positive"),
    ("update assistant_runs set status = 'sleeping'", "assistant_runs_status_known"),
    ("update assistant_runs set attempts = 4", "assistant_runs_attempts_within_max"),
    ("update assistant_runs set status = 'in_progress'", "assistant_runs_lease_only_in_progress"),
])
def test_event_and_run_checks(conn, owner, thread, sql: str, constraint: str) -> None:
    user_message(conn, owner, thread)
    with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
        conn.execute(sql, {"u": owner})


def test_an_attempt_is_recorded_once(conn, owner, thread) -> None:
    message = user_message(conn, owner, thread)
    run = conn.execute("select id from assistant_runs where message_id = %s", (message,)).fetchone()[0]
    insert = ("insert into assistant_inference_events (user_id, run_id, attempt, provider, model, status)"
              " values (%s, %s, 1, 'replicate', 'm', 'failed')")
    conn.execute(insert, (owner, run))
    with pytest.raises(psycopg.errors.UniqueViolation, match="idx_assistant_events_run_attempt"):
        conn.execute(insert, (owner, run))


def test_each_user_message_gets_one_queued_run_and_a_notification(conn, owner, thread) -> None:
    conn.execute("listen assistant_runs")
    message = user_message(conn, owner, thread)
    reply(conn, thread, message)
    runs = conn.execute("select id, message_id, thread_id, user_id, status, attempts from assistant_runs").fetchall()
    assert len(runs) == 1
    run_id, *rest = runs[0]
    assert rest == [message, thread, owner, "queued", 0]
    notices = [n.payload for n in conn.notifies(timeout=1, stop_after=1)]
    assert notices == [str(run_id)]


def test_thread_times_follow_activity(conn, owner, thread) -> None:
    created, updated, last = conn.execute(
        "select created_at, updated_at, last_message_at from assistant_threads where id = %s", (thread,)).fetchone()
    assert last is None and updated == created
    message = user_message(conn, owner, thread)
    message_at = conn.execute("select created_at from assistant_messages where id = %s", (message,)).fetchone()[0]
    updated2, last2 = conn.execute("select updated_at, last_message_at from assistant_threads where id = %s", (thread,)).fetchone()
    assert last2 == message_at and updated2 > updated
    with request(conn, postgrest.user("owner", owner), commit=True) as cur:
        cur.execute("update assistant_threads set title = 'Renamed' where id = %s", (thread,))
    assert conn.execute("select updated_at from assistant_threads where id = %s", (thread,)).fetchone()[0] > updated2


def test_deleting_a_thread_deletes_its_messages_and_runs_but_keeps_events(conn, owner, thread) -> None:
    message = user_message(conn, owner, thread)
    reply(conn, thread, message)
    conn.execute("insert into assistant_inference_events (user_id, thread_id, message_id, provider, model, status)"
                 " values (%s, %s, %s, 'replicate', 'm', 'succeeded')", (owner, thread, message))
    with request(conn, postgrest.user("owner", owner), commit=True) as cur:
        assert cur.execute("delete from assistant_threads where id = %s", (thread,)).rowcount == 1
    counts = conn.execute("select (select count(*) from assistant_messages), (select count(*) from assistant_runs),"
                          " (select count(*) from assistant_inference_events where thread_id is null and message_id is null)").fetchone()
    assert counts == (0, 0, 1)


def test_deleting_a_user_message_deletes_its_reply(conn, owner, thread) -> None:
    message = user_message(conn, owner, thread)
    reply(conn, thread, message)
    with request(conn, postgrest.user("owner", owner), commit=True) as cur:
        cur.execute("delete from assistant_messages where id = %s", (message,))
    assert conn.execute("select count(*) from assistant_messages").fetchone()[0] == 0
