"""claim_runs after the reviews of 20261123001400 (migration 20261123001600): the runs a claim
ends get their replies after every admission (usage rows before threads' rows, as completions
lock them), a request waiting for its user's replies in flight is marked so and nothing newer
passes it, a cancelled run is never taken over, and a cancellation of a run queued for a retry
is recorded under the attempt it would have been."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.conftest import PROJECT_DIR, user_message
from tests.pipeline_helpers import checking, new_user_thread, query, running_worker, say, wait_until, worker_settings
from tests.postgrest import create_user
from tests.test_assistants import make_assistant, thread_with
from tests.test_reservations import claimed, reserving_plan
from tests.test_run_functions import claim, complete, fail, run_row


def in_thread(outcome: dict, name: str, call: Callable[[], Any]) -> threading.Thread:
    """Runs `call` in a thread of its own: what it returns, or the exception it raises, goes to
    outcome[name]."""
    def target() -> None:
        try:
            outcome[name] = call()
        except Exception as exc:  # noqa: BLE001 - the test reports it
            outcome[name] = exc
    started = threading.Thread(target=target)
    started.start()
    return started


def wait_for_its_lock(conn: psycopg.Connection, waiter: psycopg.Connection, thread: threading.Thread,
                      outcome: dict) -> None:
    """Until `waiter`'s statement (run by `thread`) waits for a lock, as pg_stat_activity shows it."""
    while not conn.execute("select wait_event_type = 'Lock' from pg_stat_activity where pid = %s",
                           (waiter.info.backend_pid,)).fetchone()[0]:
        assert thread.is_alive(), outcome


def test_a_claim_that_ends_a_run_locks_usage_before_the_thread_as_a_completion_does(db_url: str, conn) -> None:
    """The claim ends U's run in thread T1 (its assistant withdrawn) and admits U's newer run in
    T2, while a completion of U holds U's usage rows and is about to update T1. Before, the claim
    had written T1's reply and then waited for the usage rows: a deadlock."""
    q = lambda sql, *p: conn.execute(sql, p).fetchone()[0]  # noqa: E731
    user = create_user(conn)
    gone = q("insert into assistants (slug, name) values ('gone', 'Gone') returning id")
    t1 = q("insert into assistant_threads (user_id, assistant_id) values (%s, %s) returning id", user, gone)
    t2 = q("insert into assistant_threads (user_id) values (%s) returning id", user)
    conn.execute("select admit_request(%s, false)", (user,))  # U's usage rows exist
    m1, m2 = user_message(conn, user, t1, "first"), user_message(conn, user, t2, "second")
    conn.execute("alter table assistants disable trigger assistants_after_withdrawal")  # as if it raced
    conn.execute("update assistants set is_active = false where id = %s", (gone,))

    with psycopg.connect(db_url) as completion, psycopg.connect(db_url, autocommit=True) as claimer:
        completion.execute("set statement_timeout = '30s'")
        completion.execute("select 1 from ai_usage_windows where user_id = %s for update", (user,))  # its first step
        outcome: dict = {}
        thread = in_thread(outcome, "claim", lambda: claimer.cursor(row_factory=dict_row).execute(
            "select * from claim_runs('w1', 10, 60)").fetchall())
        # The claim waits for the usage rows the completion holds (admitting the newer run).
        wait_for_its_lock(conn, claimer, thread, outcome)
        completion.execute("update assistant_threads set title = 'replied' where id = %s", (t1,))  # its next step
        completion.commit()
        thread.join(30)
    assert not isinstance(outcome["claim"], Exception), outcome["claim"]
    by_message = {r["message_id"]: r["blocked_code"] for r in outcome["claim"]}
    assert by_message == {m1: "assistant_unavailable", m2: None}


def test_a_newer_request_due_first_does_not_pass_an_older_one_waiting(conn) -> None:
    """A worker with one free slot claims one run: the newer request, due earlier than the older
    one that waits for the replies in flight, waits behind it."""
    user = create_user(conn, plan=reserving_plan(conn, "metered", tokens=10_000, reserve=4_000))
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    for i in range(3):
        user_message(conn, user, thread, f"m{i}")
    (first, second), [older] = claimed(conn)
    assert run_row(conn, older["run_id"])["last_error_code"] == "replies_in_flight"  # what the user sees
    complete(conn, first, p_input_tokens=60, p_output_tokens=40)  # room for one
    newer = user_message(conn, user, thread, "m3")
    conn.execute("update assistant_runs set next_attempt_at = now() - interval '1 second' where message_id = %s", (newer,))
    conn.execute("update assistant_runs set next_attempt_at = now() where id = %s", (older["run_id"],))
    [took] = claim(conn, limit=1)
    assert (took["message_id"], took["blocked_code"]) == (newer, "replies_in_flight")
    [took] = claim(conn, limit=1)
    assert (took["message_id"], took["blocked_code"]) == (older["message_id"], None)
    assert run_row(conn, older["run_id"])["last_error_code"] is None  # admitted: no longer waiting


def test_a_cancelled_run_whose_lease_expired_is_not_taken_over(conn) -> None:
    """The claim's limit leaves it to the next claim, which ends it: it never gets a new attempt."""
    user = create_user(conn)
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    last, cancelled = user_message(conn, user, thread, "a"), user_message(conn, user, thread, "b")
    conn.execute("""update assistant_runs set status = 'in_progress', lease_owner = 'dead',
                           attempts = case when message_id = %s then max_attempts else 1 end,
                           lease_expires_at = now() - case when message_id = %s then interval '2 minutes'
                                                           else interval '1 minute' end,
                           cancel_requested_at = case when message_id = %s then now() end""", (last, last, cancelled))
    # The last attempt's run ends failed; the cancelled one waits. Each comes back marked (20261123001900).
    assert [(r["message_id"], r["blocked_code"]) for r in claim(conn, limit=1)] == [(last, "lease_expired")]
    assert conn.execute("select status, attempts from assistant_runs order by created_at").fetchall() == \
        [("failed", 3), ("in_progress", 1)]
    assert [(r["message_id"], r["blocked_code"]) for r in claim(conn, limit=1)] == [(cancelled, "cancelled")]
    assert conn.execute("select status, attempts from assistant_runs where message_id = %s",
                        (cancelled,)).fetchone() == ("cancelled", 1)


def test_cancelling_a_run_queued_for_a_retry_is_recorded(conn) -> None:
    user = create_user(conn)
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    user_message(conn, user, thread)
    [run] = claim(conn)
    assert fail(conn, run) == "queued"
    assert conn.execute("select finish_cancelled(%s, null)", (run["run_id"],)).fetchone()[0] is True
    events = conn.execute("select attempt, status from assistant_inference_events where run_id = %s order by attempt",
                          (run["run_id"],)).fetchall()
    assert events == [(1, "failed"), (2, "cancelled")]


async def test_a_run_ended_at_its_claim_stops_the_attempt_this_worker_still_has(db_url, simulator) -> None:
    """This worker's attempt lost its lease (a stall), and the claim that takes the run over ends
    it as assistant_unavailable: the old attempt stops, its prediction is cancelled."""
    simulator.latency = 60
    assistant = await make_assistant(db_url, slug="fading", name="Fading")
    user, _ = await new_user_thread(db_url)
    thread = await thread_with(db_url, user, assistant["id"])
    # A long lease: the attempt's own lease keeper would find out only minutes later.
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.2, replicate_prefer_wait_seconds=1,
                               worker_lease_seconds=600)
    async with running_worker(settings, db_url) as worker:
        message = await say(db_url, user, thread, "still there?")
        await wait_until(checking(lambda: simulator.predictions), what="the prediction")
        [prediction] = simulator.predictions.values()
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute("alter table assistants disable trigger assistants_after_withdrawal")
            await conn.execute("update assistants set is_active = false where id = %s", (assistant["id"],))
            await conn.execute("update assistant_runs set lease_expires_at = now() - interval '1 second'"
                               " where message_id = %s", (message,))
        await wait_until(checking(lambda: prediction.canceled_at is not None), what="the prediction to be cancelled")
        await wait_until(checking(lambda: not worker.inflight), what="the worker's books to empty")
    assert worker.counts["abandoned"] == 1 and worker.counts["completed"] == 0
    [run] = await query(db_url, "select status, last_error_code from assistant_runs where message_id = %s", (message,))
    assert run == {"status": "failed", "last_error_code": "assistant_unavailable"}


def test_a_run_the_claim_ends_holds_nothing_while_it_admits(conn) -> None:
    """Migration 20261123001700: a run whose last lease expired is ended after the claim's
    admissions, and no longer counts as held for the user's newer request in the same claim."""
    user = create_user(conn, plan=reserving_plan(conn, "metered", tokens=10_000, reserve=4_000))
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    for i in range(2):
        user_message(conn, user, thread, f"m{i}")
    stale, live = claim(conn)
    conn.execute("update assistant_runs set attempts = max_attempts, lease_expires_at = now() - interval '1 second'"
                 " where id = %s", (stale["run_id"],))
    newer = user_message(conn, user, thread, "m2")
    # 4,000 held by the live run + 4,000 for this one: room; the stale one ends, returned marked
    took = {r["message_id"]: r["blocked_code"] for r in claim(conn)}
    assert took == {newer: None, stale["message_id"]: "lease_expired"}
    assert run_row(conn, stale["run_id"])["status"] == "failed"


def test_a_profile_written_long_before_the_limit_is_emptied_and_the_limit_validated(conn) -> None:
    """Migration 20261123001700, applied to a database with such a profile."""
    user, kept = create_user(conn), create_user(conn)
    [definition] = conn.execute("select pg_get_constraintdef(oid) from pg_constraint"
                                " where conname = 'ai_profiles_numbers_in_range'").fetchone()
    conn.execute("alter table ai_profiles drop constraint ai_profiles_numbers_in_range")
    conn.execute("insert into ai_profiles (user_id, goals, experience_level, preferences)"
                 " values (%s, '[\"run\"]', 'beginner', '{\"x\": 1e5000}'), (%s, '[\"swim\"]', null, '{\"x\": 7}')",
                 (user, kept))
    conn.execute(f"alter table ai_profiles add constraint ai_profiles_numbers_in_range {definition} not valid")
    [migration] = (PROJECT_DIR / "supabase" / "migrations").glob("20261123001700_*.sql")
    conn.execute(migration.read_text())
    assert conn.execute("select user_id, goals, experience_level, preferences from ai_profiles order by experience_level nulls last"
                        ).fetchall() == [(user, [], "beginner", {}), (kept, ["swim"], None, {"x": 7})]
    assert conn.execute("select convalidated from pg_constraint where conname = 'ai_profiles_numbers_in_range'"
                        ).fetchone()[0] is True


@pytest.mark.parametrize("function", ["complete_run", "complete_runs"])
def test_a_message_deleted_while_its_reply_is_written_is_deleted_without_a_deadlock(db_url: str, conn, function) -> None:
    """Migration 20261123001800: the completion takes the message's key before the run, as the
    delete takes the message before the run (its cascade). Here the completion waits for the
    user's usage rows (held by another transaction) after taking its locks; the user deletes the
    message meanwhile; then the usage rows are freed."""
    user = create_user(conn)
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    message = user_message(conn, user, thread)
    [run] = claim(conn)  # admitted: the user's usage rows exist
    outcome: dict = {}
    with psycopg.connect(db_url) as usage, psycopg.connect(db_url, autocommit=True) as worker, \
            psycopg.connect(db_url, autocommit=True) as client:
        usage.execute("select 1 from ai_usage_windows where user_id = %s for update", (user,))
        one = {"run_id": str(run["run_id"]), "attempt": run["attempt"], "content": "An answer.",
               "model": "meta/meta-llama-3-8b-instruct", "input_tokens": 10, "output_tokens": 5}
        sql, args = (("select complete_run(%(run_id)s, %(attempt)s, %(content)s, %(model)s,"
                      " p_input_tokens => %(input_tokens)s, p_output_tokens => %(output_tokens)s)", one)
                     if function == "complete_run" else ("select * from complete_runs(%s)", (Jsonb([one]),)))
        completing = in_thread(outcome, "complete", lambda: worker.execute(sql, args).fetchall())
        wait_for_its_lock(conn, worker, completing, outcome)  # for the usage rows
        deleting = in_thread(outcome, "delete", lambda: client.execute(
            "delete from assistant_messages where id = %s", (message,)).rowcount)
        wait_for_its_lock(conn, client, deleting, outcome)  # for the completion
        usage.commit()
        completing.join(30)
        deleting.join(30)
    assert not any(isinstance(v, Exception) for v in outcome.values()), outcome
    assert outcome["delete"] == 1
    assert conn.execute("select count(*) from assistant_messages where thread_id = %s", (thread,)).fetchone()[0] == 0


@pytest.mark.parametrize("cancelled", [False, True])
async def test_a_run_the_claim_ends_stale_stops_this_worker_s_attempt_and_is_counted(db_url, simulator, monkeypatch,
                                                                                      cancelled: bool) -> None:
    """Migration 20261123001900: this worker's attempt lost its lease on the run's last attempt (a
    stall), and its own claim ends the run (lease_expired, or cancelled when its user asked
    meanwhile): the claim returns it marked, the attempt stops, its prediction is cancelled, and
    the run is counted. A cancelled one's prediction is recorded on the run's cancelled event."""
    simulator.latency = 60
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.2, replicate_prefer_wait_seconds=1,
                               worker_lease_seconds=600)
    async with running_worker(settings, db_url) as worker:
        async def no_cancellations(run_ids: list) -> list:  # the stalled worker did not look in time
            return []
        monkeypatch.setattr(worker.store, "cancelled_runs", no_cancellations)
        message = await say(db_url, user, thread, "still there?")
        await wait_until(checking(lambda: simulator.predictions), what="the prediction")
        [prediction] = simulator.predictions.values()
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute("update assistant_runs set max_attempts = attempts, lease_expires_at = now() - interval"
                               " '1 second', cancel_requested_at = case when %s then now() end where message_id = %s",
                               (cancelled, message))
        await wait_until(checking(lambda: prediction.canceled_at is not None), what="the prediction to be cancelled")
        await wait_until(checking(lambda: not worker.inflight and not worker.recording), what="the worker's books")
    assert worker.counts["abandoned"] == 1 and worker.counts["completed"] == 0
    if cancelled:
        assert worker.counts["cancelled"] == 1 and worker.counts["failed.lease_expired"] == 0
    else:
        assert worker.counts["failed.lease_expired"] == 1 and worker.counts["cancelled"] == 0
    [run] = await query(db_url, "select id, status, last_error_code, attempts from assistant_runs where message_id = %s",
                        (message,))
    code = "cancelled" if cancelled else "lease_expired"
    assert (run["status"], run["last_error_code"]) == ("cancelled" if cancelled else "failed", code)
    events = await query(db_url, "select attempt, status, error_code, prediction_id from assistant_inference_events"
                                 " where run_id = %s", (run["id"],))
    status = "cancelled" if cancelled else "failed"
    expected_code = "cancelled" if cancelled else "lease_lost"
    assert events == [{"attempt": run["attempts"], "status": status, "error_code": expected_code,
                       "prediction_id": prediction.id}]
