"""The queue cap (migration 20261123001000): a client cannot queue more messages than its plan
allows to wait for a worker at once; the refusal is SQLSTATE PT429 (HTTP 429 through
PostgREST), says why, and stores nothing. A burst from two connections cannot both take the last
place."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import psycopg.errors
import pytest

from tests import postgrest
from tests.postgrest import create_user, request
from tests.supabase_emulator import pg_error_status


def _thread(conn: psycopg.Connection, user: uuid.UUID) -> uuid.UUID:
    return conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]


def _ask(conn: psycopg.Connection, user: uuid.UUID, thread: uuid.UUID, content: str = "hello?") -> uuid.UUID:
    with request(conn, postgrest.user("u", user), commit=True) as cur:
        return cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'user', %s)"
                           " returning id", (thread, content)).fetchone()[0]


def _messages(conn: psycopg.Connection, user: uuid.UUID) -> int:
    return conn.execute("select count(*) from assistant_messages where user_id = %s", (user,)).fetchone()[0]


def _too_many() -> pytest.RaisesContext:
    """The refusal: psycopg has no class of its own for PostgREST's custom SQLSTATEs."""
    return pytest.raises(psycopg.Error, match="messages waiting in the queue")


def _cap(conn: psycopg.Connection, plan: str) -> int | None:
    return conn.execute("select max_queued_requests from ai_plans where id = %s", (plan,)).fetchone()[0]


@pytest.mark.parametrize(("plan", "anonymous"), [(None, True), (None, False), ("premium", False), ("byok", False)])
def test_a_client_cannot_queue_more_than_its_plan_allows(conn: psycopg.Connection, plan: str | None,
                                                         anonymous: bool) -> None:
    user = create_user(conn, is_anonymous=anonymous, plan=plan)
    cap = _cap(conn, plan or ("guest" if anonymous else "free"))
    assert cap is not None and cap >= 1
    thread = _thread(conn, user)
    for k in range(cap):
        _ask(conn, user, thread, f"question {k}")

    with _too_many() as refusal:
        _ask(conn, user, thread, "one too many")
    error = refusal.value.diag
    assert refusal.value.sqlstate == error.sqlstate == "PT429" and pg_error_status(error.sqlstate, authed=True) == 429
    assert f"you have {cap} messages waiting in the queue" in str(refusal.value)
    assert error.message_detail == f"queued requests: {cap}, limit: {cap}"
    assert "wait for a reply" in (error.message_hint or "")
    assert _messages(conn, user) == cap  # nothing of the refused message was stored
    assert conn.execute("select count(*) from assistant_runs where user_id = %s", (user,)).fetchone()[0] == cap


def test_a_place_frees_when_a_request_ends(conn: psycopg.Connection) -> None:
    user = create_user(conn, plan="free")
    cap = _cap(conn, "free")
    thread = _thread(conn, user)
    asked = [_ask(conn, user, thread) for _ in range(cap)]
    with _too_many():
        _ask(conn, user, thread)

    # One ends (completed, failed, blocked or cancelled all leave the queue); one is taken by a
    # worker (being answered, it is no longer ahead of anyone).
    conn.execute("update assistant_runs set status = 'cancelled', finished_at = now() where message_id = %s",
                 (asked[0],))
    conn.execute("update assistant_runs set status = 'in_progress', lease_owner = 'w', attempts = 1,"
                 " lease_expires_at = now() + interval '1 minute' where message_id = %s", (asked[1],))
    _ask(conn, user, thread, "now there is room")
    _ask(conn, user, thread, "and for one more")
    with _too_many():
        _ask(conn, user, thread)
    # A run whose attempt failed goes back to the queue to wait for its retry: it counts again.
    conn.execute("update assistant_runs set status = 'queued', lease_owner = null, lease_expires_at = null"
                 " where message_id = %s", (asked[1],))
    assert conn.execute("select count(*) from assistant_runs where user_id = %s and status = 'queued'",
                        (user,)).fetchone()[0] == cap + 1  # over the cap: no new message until it drains
    with _too_many():
        _ask(conn, user, thread)
    assert _messages(conn, user) == cap + 2


def test_server_writes_and_uncapped_plans_are_not_limited(conn: psycopg.Connection) -> None:
    capped = create_user(conn, plan="guest")
    thread = _thread(conn, capped)
    for _ in range(_cap(conn, "guest") + 3):  # the service role (an import, a server-side agent) is not capped
        with request(conn, postgrest.service(), commit=True) as cur:
            cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'user', 'q')", (thread,))

    uncapped = create_user(conn, plan="unlimited")  # a plan with a null cap, like plans made before the cap
    assert _cap(conn, "unlimited") is None
    other = _thread(conn, uncapped)
    for _ in range(20):
        _ask(conn, uncapped, other)
    assert _messages(conn, uncapped) == 20


def test_the_cap_must_be_positive(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="ai_plans_max_queued_requests_positive"):
        conn.execute("update ai_plans set max_queued_requests = 0 where id = 'free'")


def test_a_guard_refusal_keeps_its_own_reason(conn: psycopg.Connection) -> None:
    """A user at the cap who also breaks a rule of the guard hears the rule first."""
    user = create_user(conn, plan="guest")
    thread = _thread(conn, user)
    for _ in range(_cap(conn, "guest")):
        _ask(conn, user, thread)
    with request(conn, postgrest.user("u", user)) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege,
                                                                        match="only write messages with role 'user'"):
        cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'assistant', 'x')", (thread,))


def _wait_for_lock_wait(conn: psycopg.Connection, pid: int) -> None:
    """Until backend `pid` waits on a lock (bounded: the test fails if it never does)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        waiting = conn.execute("select wait_event_type = 'Lock' from pg_stat_activity where pid = %s",
                               (pid,)).fetchone()
        if waiting and waiting[0]:
            return
        time.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for the lock")


def test_two_concurrent_inserts_cannot_both_take_the_last_place(conn: psycopg.Connection, db_url: str) -> None:
    user = create_user(conn, plan="free")
    cap = _cap(conn, "free")
    thread = _thread(conn, user)
    for _ in range(cap - 1):
        _ask(conn, user, thread)

    with psycopg.connect(db_url, autocommit=True) as first, psycopg.connect(db_url, autocommit=True) as second:
        second_pid = second.info.backend_pid
        outcome: dict[str, BaseException | None] = {}
        with request(first, postgrest.user("u", user), commit=True) as cur:
            cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'user', 'a')", (thread,))

            def ask_second() -> None:
                try:
                    _ask(second, user, thread, "b")
                    outcome["second"] = None
                except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                    outcome["second"] = exc

            racer = threading.Thread(target=ask_second)
            racer.start()
            _wait_for_lock_wait(conn, second_pid)  # the second insert waits for the first to commit
        racer.join(timeout=10)
        assert not racer.is_alive()
    refused = outcome["second"]
    assert isinstance(refused, psycopg.Error) and refused.sqlstate == "PT429", outcome
    assert _messages(conn, user) == cap


def test_one_insert_of_many_rows_is_capped_row_by_row(conn: psycopg.Connection) -> None:
    """PostgREST inserts a JSON array in one statement: every row's run counts for the rows after
    it, so an array beyond the cap is refused whole, and one within it is stored."""
    user = create_user(conn, plan="free")
    cap = _cap(conn, "free")
    thread = _thread(conn, user)
    many = ("insert into assistant_messages (thread_id, role, content)"
            " select %s, 'user', 'burst ' || g from generate_series(1, %s) g")
    with request(conn, postgrest.user("u", user)) as cur, _too_many() as refusal:
        cur.execute(many, (thread, cap + 1))
    assert refusal.value.diag.message_detail == f"queued requests: {cap}, limit: {cap}"
    assert _messages(conn, user) == 0  # the whole statement was refused
    with request(conn, postgrest.user("u", user), commit=True) as cur:
        cur.execute(many, (thread, cap))
    assert _messages(conn, user) == cap


def test_an_insert_waiting_for_the_users_lock_holds_no_thread_row(conn: psycopg.Connection, db_url: str) -> None:
    """Lock order, so that two inserts of one user cannot deadlock: the user's cap lock is taken
    before the statement locks any thread row. While a multi-row insert waits for that lock, its
    threads stay free (were it taken after, the insert would hold thread A while waiting, and an
    insert into A by a transaction holding the lock would deadlock with it)."""
    user = create_user(conn, plan="premium")
    first_thread, second_thread = _thread(conn, user), _thread(conn, user)
    with psycopg.connect(db_url, autocommit=True) as single, psycopg.connect(db_url, autocommit=True) as multi:
        outcome: dict[str, BaseException | None] = {}
        with request(single, postgrest.user("u", user), commit=True) as cur:
            cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'user', 'b')",
                        (second_thread,))

            def insert_both() -> None:
                try:
                    with request(multi, postgrest.user("u", user), commit=True) as other:
                        other.execute("insert into assistant_messages (thread_id, role, content)"
                                      " values (%s, 'user', 'a'), (%s, 'user', 'b')", (first_thread, second_thread))
                    outcome["multi"] = None
                except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                    outcome["multi"] = exc

            racer = threading.Thread(target=insert_both)
            racer.start()
            _wait_for_lock_wait(conn, multi.info.backend_pid)
            with conn.transaction():  # thread A is not locked by the waiting insert
                conn.execute("set local lock_timeout = '2s'")
                conn.execute("select 1 from assistant_threads where id = %s for update", (first_thread,))
        racer.join(timeout=10)
        assert not racer.is_alive()
    assert outcome["multi"] is None, outcome
    assert _messages(conn, user) == 3
