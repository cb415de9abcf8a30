"""Token and cost limits against a burst: each admitted request holds part of the limit while it is
in flight (ai_plans.reserve_tokens / reserve_usd, migration 20261123001300), so the requests in
flight cannot take a user past a limit together; a request that would waits in the queue."""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal

import psycopg
from psycopg.rows import dict_row

from tests.conftest import user_message
from tests.pipeline_helpers import as_user, finished_runs, new_user_thread, running_worker, say, worker_settings
from tests.postgrest import create_user
from tests.test_run_functions import MODEL, claim, complete, fail, run_row
from tests.test_usage import admit, make_plan


def reserving_plan(conn: psycopg.Connection, plan: str, tokens: int, reserve: int) -> str:
    make_plan(conn, plan, [("tokens", "day", tokens)])
    conn.execute("update ai_plans set reserve_tokens = %s where id = %s", (reserve, plan))
    return plan


def tokens_used(conn: psycopg.Connection, user: uuid.UUID) -> int:
    row = conn.execute("select tokens from ai_usage_windows where user_id = %s and time_window = 'day'", (user,)).fetchone()
    return int(row[0]) if row else 0


def claimed(conn: psycopg.Connection) -> tuple[list[dict], list[dict]]:
    """A claim's runs to work on, and those it put back to wait for the replies in flight."""
    rows = claim(conn)
    assert all(r["blocked_code"] in (None, "replies_in_flight") for r in rows), rows
    return [r for r in rows if r["blocked_code"] is None], [r for r in rows if r["blocked_code"]]


def queued_again(conn: psycopg.Connection) -> None:
    """A second has passed: runs put back to wait for replies in flight are due again."""
    conn.execute("update assistant_runs set next_attempt_at = now() where status = 'queued'")


def test_requests_in_flight_hold_part_of_a_token_limit_and_the_next_one_waits(conn) -> None:
    user = create_user(conn, plan=reserving_plan(conn, "metered", tokens=10_000, reserve=4_000))
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    messages = [user_message(conn, user, thread, f"m{i}") for i in range(3)]
    before = conn.execute("select now()").fetchone()[0]
    admitted, [told_to_wait] = claimed(conn)
    first, second = sorted(admitted, key=lambda r: messages.index(r["message_id"]))
    # 4,000 + 4,000 held fit in 10,000; a third 4,000 would not: it waits, not refused, not an
    # attempt. The user's messages are admitted in the order they were written.
    assert [first["message_id"], second["message_id"], told_to_wait["message_id"]] == messages
    third = messages[2]
    assert [run_row(conn, r["run_id"])["reserved_tokens"] for r in (first, second)] == [4_000, 4_000]
    waiting = conn.execute("select status, attempts, admitted_at, next_attempt_at >= %s + interval '1 second'"
                           " from assistant_runs where message_id = %s", (before, third)).fetchone()
    assert waiting == ("queued", 0, None, True)  # due again a second after the claim
    queued_again(conn)
    assert claimed(conn)[0] == []  # still 8,000 held + 4,000 > 10,000
    complete(conn, first, p_input_tokens=2_000, p_output_tokens=1_000)
    queued_again(conn)
    assert claimed(conn)[0] == []  # 3,000 used + 4,000 held + 4,000 > 10,000
    complete(conn, second, p_input_tokens=2_000, p_output_tokens=1_000)
    queued_again(conn)
    [third_run] = claim(conn)  # admitted once nothing is in flight: 6,000 used
    assert (third_run["message_id"], third_run["attempt"], third_run["blocked_code"]) == (third, 1, None)
    # With nothing else in flight a request is admitted while the limit is not reached, so its
    # reply may end past it by what it used beyond its reservation; the next is then refused.
    complete(conn, third_run, p_input_tokens=3_000, p_output_tokens=2_000)
    assert tokens_used(conn, user) == 11_000
    fourth = user_message(conn, user, thread, "m3")
    [refused] = claim(conn)
    assert (refused["message_id"], refused["blocked_code"]) == (fourth, "quota_exceeded")


def test_a_message_written_while_an_older_one_waits_is_admitted_after_it(conn) -> None:
    """Migration 20261123001400: a reply that ends between the older request's claim and the
    newer one's made room for one request; the older one takes it, the newer waits its turn."""
    user = create_user(conn, plan=reserving_plan(conn, "metered", tokens=10_000, reserve=4_000))
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    messages = [user_message(conn, user, thread, f"m{i}") for i in range(3)]
    (first, second), [older] = claimed(conn)
    assert older["message_id"] == messages[2]
    complete(conn, first, p_input_tokens=60, p_output_tokens=40)  # 100 used + 4,000 held: room for one
    newer = user_message(conn, user, thread, "m3")
    # Only the newer message is due: the older one waits until a second after its claim.
    admitted, waiting = claimed(conn)
    assert (admitted, [r["message_id"] for r in waiting]) == ([], [newer])
    assert run_row(conn, waiting[0]["run_id"])["attempts"] == 0  # not an attempt: it waits as the older one does
    queued_again(conn)
    admitted, waiting = claimed(conn)
    assert [r["message_id"] for r in admitted] == [older["message_id"]]
    assert [r["message_id"] for r in waiting] == [newer]  # 100 used + 8,000 held + 4,000 > 10,000
    complete(conn, second, p_input_tokens=60, p_output_tokens=40)
    queued_again(conn)
    [last] = claim(conn)
    assert (last["message_id"], last["blocked_code"], last["attempt"]) == (newer, None, 1)


def test_a_run_that_ends_any_way_stops_holding(conn) -> None:
    """Failed for good, cancelled, deleted, failed and queued for a retry: only an open run holds."""
    user = create_user(conn, plan=reserving_plan(conn, "metered", tokens=8_000, reserve=4_000))
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    held = "select coalesce(sum(reserved_tokens), 0) from assistant_runs where user_id = %s and status in ('queued', 'in_progress')"
    for end in ("failed", "cancelled", "deleted"):
        message = user_message(conn, user, thread, end)
        [run] = claim(conn)
        assert conn.execute(held, (user,)).fetchone()[0] == 4_000
        if end == "failed":
            assert fail(conn, run, "invalid_input", p_retryable=False) == "failed"  # the run ends
        elif end == "cancelled":
            conn.execute("select finish_cancelled(%s, null)", (run["run_id"],))
        else:
            conn.execute("delete from assistant_messages where id = %s", (message,))
        assert conn.execute(held, (user,)).fetchone()[0] == 0, end
    # A failed attempt queued for a retry still holds: the retry will use tokens.
    user_message(conn, user, thread, "retried")
    [run] = claim(conn)
    assert fail(conn, run, "provider_unavailable") == "queued"
    assert conn.execute(held, (user,)).fetchone()[0] == 4_000


def test_plans_without_reservations_admit_as_before(conn) -> None:
    make_plan(conn, "metered_plain", [("tokens", "day", 100)])
    user = create_user(conn, plan="metered_plain")
    assert [admit(conn, user)["admitted"] for _ in range(5)] == [True] * 5  # in flight: nothing counted
    verdict = admit(conn, user)
    assert (verdict["reserve_tokens"], verdict["reserve_usd"]) == (0, 0)
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    user_message(conn, user, thread)
    [run] = claim(conn)
    assert run_row(conn, run["run_id"])["reserved_tokens"] == 0


def test_a_cost_limit_holds_too(conn) -> None:
    make_plan(conn, "metered_cost", [("cost_usd", "month", Decimal("0.01"))])
    conn.execute("update ai_plans set reserve_usd = 0.004 where id = 'metered_cost'")
    user = create_user(conn, plan="metered_cost")
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    for i in range(3):
        user_message(conn, user, thread, f"m{i}")
    runs, waiting = claimed(conn)
    assert len(runs) == 2 and [run_row(conn, r["run_id"])["reserved_usd"] for r in runs] == [Decimal("0.004")] * 2
    assert len(waiting) == 1


def test_a_burst_through_concurrent_claims_stays_within_the_token_limit(db_url: str, conn) -> None:
    """Six workers claim a burst of 30 messages while replies are written as they come, each
    using what it reserved: the user ends at the limit, not past it. Without reservations every
    claim before the first reply was admitted (each limit refuses only once reached)."""
    user = create_user(conn, plan=reserving_plan(conn, "metered", tokens=20_000, reserve=4_000))
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    for i in range(30):
        user_message(conn, user, thread, f"burst {i}")
    barrier = threading.Barrier(7)
    errors: list[BaseException] = []

    def open_runs(c: psycopg.Connection) -> int:
        return c.execute("select count(*) from assistant_runs where status in ('queued', 'in_progress')").fetchone()[0]

    def claimer(name: str) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as c:
                barrier.wait()
                while open_runs(c):
                    claim(c, name, 4)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def replier() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as c:
                barrier.wait()
                while open_runs(c):
                    cur = c.cursor(row_factory=dict_row)
                    for run in cur.execute("select id as run_id, attempts as attempt from assistant_runs"
                                           " where status = 'in_progress'").fetchall():
                        complete(c, run, p_input_tokens=3_000, p_output_tokens=1_000, p_model=MODEL)
                    # Time passes (from this thread only: two such updates at once deadlock each
                    # other): runs put back to wait are due again.
                    c.execute("update assistant_runs set next_attempt_at = now() where status = 'queued'")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)] + [threading.Thread(target=replier)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    statuses = dict(conn.execute("select status, count(*) from assistant_runs group by status").fetchall())
    assert statuses == {"completed": 5, "blocked": 25}
    assert tokens_used(conn, user) == 20_000


async def test_the_worker_answers_a_request_that_waited_for_the_replies_in_flight(db_url, simulator) -> None:
    """Three messages at once in three threads, room for two in flight: the third is put back for
    a second, and the worker claims it again then (the claim tells it so; its sweep here is an
    hour away) and answers it once the first two are answered. No run is refused."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("insert into ai_plans (id, name, reserve_tokens) values ('metered', 'metered', 4000)")
        await conn.execute("insert into ai_plan_limits (plan_id, metric, time_window, limit_value)"
                           " values ('metered', 'tokens', 'day', 10000)")
    user, first_thread = await new_user_thread(db_url, plan="metered")
    threads = [first_thread, *[(await as_user(db_url, user, "insert into assistant_threads (title) values ('t')"
                                                            " returning id"))[0]["id"] for _ in range(2)]]
    simulator.latency = 2.0  # the three are claimed while the first two are in flight
    async with running_worker(worker_settings(simulator.base_url), db_url) as worker:
        for i, thread in enumerate(threads):
            await say(db_url, user, thread, f"question {i}")
        runs = await finished_runs(db_url, 3, timeout=30)
    assert {r["status"] for r in runs} == {"completed"} and {r["attempts"] for r in runs} == {1}
    assert worker.counts["waited"] >= 1 and worker.counts["blocked"] == 0
    assert worker.metrics.registry.get_sample_value("assistant_runs_blocked_total", {"error_code": "replies_in_flight"}) \
        is None
    assert {r["reserved_tokens"] for r in runs} == {4000}
