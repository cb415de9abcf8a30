"""The worker's SQL API: claim, complete, fail, release, extend, straight on the database."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
import uuid

import psycopg
import psycopg.errors
import pytest

from tests import postgrest
from tests.conftest import user_message as say
from tests.postgrest import create_user, request
from tests.test_usage import COUNTERS

MODEL = "meta/meta-llama-3-8b-instruct"


def claim(conn: psycopg.Connection, worker: str = "w1", limit: int = 10, lease: int = 60) -> list[dict]:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("select * from claim_runs(%s, %s, %s)", (worker, limit, lease)).fetchall()


def complete(conn: psycopg.Connection, run: dict, content: str = "An answer.", **extra) -> uuid.UUID:
    args = {"p_run_id": run["run_id"], "p_attempt": run["attempt"], "p_content": content, "p_model": MODEL,
            "p_prediction_id": "pred-1", "p_input_tokens": 12, "p_output_tokens": 3, "p_cost_usd": Decimal("0.000005"),
            "p_latency_ms": 250, **extra}
    names = ", ".join(f"{k} => %({k})s" for k in args)
    return conn.execute(f"select complete_run({names})", args).fetchone()[0]


def fail(conn: psycopg.Connection, run: dict, code: str = "provider_unavailable", **extra) -> str:
    args = {"p_run_id": run["run_id"], "p_attempt": run["attempt"], "p_error_code": code, "p_error": "boom",
            "p_model": MODEL, **extra}
    names = ", ".join(f"{k} => %({k})s" for k in args)
    return conn.execute(f"select fail_attempt({names})", args).fetchone()[0]


def run_row(conn: psycopg.Connection, run_id: uuid.UUID) -> dict:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("select * from assistant_runs where id = %s", (run_id,)).fetchone()


def expire_lease(conn: psycopg.Connection, run_id: uuid.UUID) -> None:
    conn.execute("update assistant_runs set lease_expires_at = now() - interval '1 second' where id = %s", (run_id,))


def test_claim_returns_the_message_and_its_history(conn, owner, thread) -> None:
    first = say(conn, owner, thread, "first question")
    [run] = claim(conn)
    complete(conn, run, "first answer")
    say(conn, owner, thread, "second question")
    [run2] = claim(conn)
    assert run2["content"] == "second question" and run2["attempt"] == 1 and run2["thread_id"] == thread
    assert [(h["role"], h["content"]) for h in run2["history"]] == [("user", "first question"), ("assistant", "first answer")]
    assert run["message_id"] == first
    row = run_row(conn, run2["run_id"])
    assert row["status"] == "in_progress" and row["lease_owner"] == "w1" and row["attempts"] == 1
    assert claim(conn) == []


def test_history_is_the_last_50_and_leaves_failure_notices_out(conn, owner, thread) -> None:
    conn.execute("""insert into assistant_messages (thread_id, role, content, created_at)
                    select %s, 'system', 'note ' || i, now() - interval '1 hour' + i * interval '1 second'
                      from generate_series(1, 60) i""", (thread,))
    say(conn, owner, thread, "q1")
    [run] = claim(conn)
    fail(conn, run, "unauthorized", p_retryable=False)
    say(conn, owner, thread, "q2")
    [run2] = claim(conn)
    contents = [h["content"] for h in run2["history"]]
    assert len(contents) == 50
    assert contents[-1] == "q1" and contents[0] == "note 12"
    assert not any(c.startswith("Sorry") for c in contents)


def test_complete_writes_reply_event_and_run_once(conn, owner, thread) -> None:
    message = say(conn, owner, thread)
    [run] = claim(conn)
    reply = complete(conn, run)
    assert complete(conn, run) == reply  # a repeated call after a crash changes nothing
    assert complete(conn, run, "a different answer") == reply
    rows = conn.execute("select role, content, reply_to, model, token_count, latency_ms, user_id from assistant_messages"
                        " where role = 'assistant'").fetchall()
    assert rows == [("assistant", "An answer.", message, MODEL, 3, 250, owner)]
    events = conn.execute("select status, attempt, provider, model, prediction_id, input_tokens, output_tokens,"
                          " cost_estimate_usd::text, latency_ms, message_id from assistant_inference_events").fetchall()
    assert events == [("succeeded", 1, "replicate", MODEL, "pred-1", 12, 3, "0.000005", 250, message)]
    row = run_row(conn, run["run_id"])
    assert row["status"] == "completed" and row["lease_owner"] is None and row["finished_at"] is not None


def test_long_replies_are_truncated_with_a_flag(conn, owner, thread) -> None:
    say(conn, owner, thread)
    [run] = claim(conn)
    complete(conn, run, "y" * 9000, p_metadata='{"route": "chat"}')
    content, metadata = conn.execute("select content, metadata_json from assistant_messages where role = 'assistant'").fetchone()
    assert len(content) == 8000
    assert metadata == {"route": "chat", "truncated": True, "original_length": 9000}


def test_empty_reply_is_refused(conn, owner, thread) -> None:
    say(conn, owner, thread)
    [run] = claim(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="cannot be empty"):
        complete(conn, run, "   ")


def test_retryable_failure_requeues_with_backoff_then_fails_with_a_reply(conn, owner, thread) -> None:
    message = say(conn, owner, thread)
    [run] = claim(conn)
    assert fail(conn, run) == "queued"
    row = run_row(conn, run["run_id"])
    assert row["status"] == "queued" and row["last_error_code"] == "provider_unavailable"
    delay = conn.execute("select extract(epoch from next_attempt_at - now()) from assistant_runs").fetchone()[0]
    assert 1.5 < float(delay) <= 2.0  # 2^1 seconds after the first attempt
    assert claim(conn) == []  # not due yet
    for attempt in (2, 3):
        conn.execute("update assistant_runs set next_attempt_at = now()")
        [run] = claim(conn)
        assert run["attempt"] == attempt
        status = fail(conn, run, "rate_limited", p_retry_in_seconds=7)
    assert status == "failed"
    reply = conn.execute("select content, metadata_json, reply_to from assistant_messages where role = 'assistant'").fetchone()
    assert reply[0].startswith("Sorry, I could not produce a reply this time: the model service is busy.")
    assert reply[1] == {"error_code": "rate_limited", "failed": True} and reply[2] == message
    events = conn.execute("select attempt, status, error_code from assistant_inference_events order by attempt").fetchall()
    assert events == [(1, "failed", "provider_unavailable"), (2, "failed", "rate_limited"), (3, "failed", "rate_limited")]
    assert fail(conn, run, "rate_limited") == "failed"  # repeating changes nothing
    assert conn.execute("select count(*) from assistant_messages where role = 'assistant'").fetchone()[0] == 1


def test_retry_after_is_honoured(conn, owner, thread) -> None:
    say(conn, owner, thread)
    [run] = claim(conn)
    fail(conn, run, "rate_limited", p_retry_in_seconds=30)
    delay = conn.execute("select extract(epoch from next_attempt_at - now()) from assistant_runs").fetchone()[0]
    assert 29 < float(delay) <= 30


def test_non_retryable_failure_ends_at_once(conn, owner, thread) -> None:
    say(conn, owner, thread)
    [run] = claim(conn)
    assert fail(conn, run, "billing_required", p_retryable=False) == "failed"
    assert run_row(conn, run["run_id"])["attempts"] == 1


def test_bad_error_code_is_refused(conn, owner, thread) -> None:
    say(conn, owner, thread)
    [run] = claim(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="lower_snake_case"):
        fail(conn, run, "Oops!")


def test_a_failed_attempt_records_what_its_prediction_consumed_on_its_event_only(conn, owner, thread) -> None:
    """The operator pays for a prediction that failed: its tokens and cost go on the attempt's
    event (and so into the operator reports), not into the user's usage."""
    say(conn, owner, thread)
    [run] = claim(conn)
    before = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    consumed = psycopg.types.json.Jsonb({"input_tokens": 40, "output_tokens": 7, "cost_usd": "0.00001"})
    assert fail(conn, run, "model_failed", p_prediction_id="pred-f", p_consumed=consumed) == "queued"
    assert fail(conn, run, "model_failed", p_prediction_id="pred-f", p_consumed=consumed) == "queued"  # once
    events = conn.execute("select status, prediction_id, input_tokens, output_tokens, cost_estimate_usd, error_code"
                          " from assistant_inference_events where run_id = %s", (run["run_id"],)).fetchall()
    assert events == [("failed", "pred-f", 40, 7, Decimal("0.00001"), "model_failed")]
    assert {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()} == before
    conn.execute("refresh materialized view ai_usage_daily")
    [(cost, failures)] = conn.execute("select cost_usd, failures from ai_usage_daily where user_id = %s", (owner,)).fetchall()
    assert (cost, failures) == (Decimal("0.00001"), 1)


def test_a_failed_attempt_s_consumption_must_be_an_object(conn, owner, thread) -> None:
    say(conn, owner, thread)
    [run] = claim(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_consumed must be an object"):
        fail(conn, run, "model_failed", p_consumed=psycopg.types.json.Jsonb([40, 7]))
    assert run_row(conn, run["run_id"])["status"] == "in_progress"


def test_expired_lease_is_claimed_again_and_the_late_worker_cannot_double_reply(conn, owner, thread) -> None:
    say(conn, owner, thread)
    [first] = claim(conn, "w1")
    expire_lease(conn, first["run_id"])
    [second] = claim(conn, "w2")
    assert second["run_id"] == first["run_id"] and second["attempt"] == 2
    reply = complete(conn, second, "from w2")
    assert complete(conn, second, "from w2") == reply  # the same call again: its reply
    assert complete(conn, first, "from w1, late") is None  # not its reply (20261123001900, 5)
    assert fail(conn, first) == "superseded"
    assert conn.execute("select content from assistant_messages where role = 'assistant'").fetchall() == [("from w2",)]


@pytest.mark.parametrize("batch", [False, True])
def test_a_completion_of_a_run_that_ended_failed_meanwhile_answers_no_reply(conn, owner, thread, batch: bool) -> None:
    """The last attempt's lease ran out while its reply was on its way, and a claim ended the run
    (lease_expired, with its notice): the reply the run has is not this attempt's, and the call
    says so (it answered the notice's id, and the worker counted a completed run)."""
    message = say(conn, owner, thread)
    [run] = claim(conn)
    conn.execute("update assistant_runs set max_attempts = 1, lease_expires_at = now() - interval '1 second'"
                 " where id = %s", (run["run_id"],))
    assert [r["blocked_code"] for r in claim(conn)] == ["lease_expired"]
    if batch:
        one = {"run_id": str(run["run_id"]), "attempt": run["attempt"], "content": "late", "model": MODEL}
        answered = conn.execute("select run_id, reply_id from complete_runs(%s)",
                                (psycopg.types.json.Jsonb([one]),)).fetchall()
        assert answered == [(run["run_id"], None)]
    else:
        assert complete(conn, run, "late") is None
    [(notice, metadata)] = conn.execute("select content, metadata_json from assistant_messages where reply_to = %s",
                                        (message,)).fetchall()
    assert metadata["error_code"] == "lease_expired"


def test_late_failure_of_a_reclaimed_attempt_leaves_the_run_alone(conn, owner, thread) -> None:
    say(conn, owner, thread)
    [first] = claim(conn, "w1")
    expire_lease(conn, first["run_id"])
    [second] = claim(conn, "w2")
    assert fail(conn, first) == "superseded"
    row = run_row(conn, second["run_id"])
    assert (row["status"], row["lease_owner"], row["attempts"]) == ("in_progress", "w2", 2)
    # The run ends failed by the second attempt: only that call says so, whatever the first says late.
    assert fail(conn, second, p_retryable=False) == "failed"
    assert fail(conn, first, p_retryable=False) == "superseded"
    events = conn.execute("select attempt, error_code from assistant_inference_events where run_id = %s order by attempt",
                          (first["run_id"],)).fetchall()
    assert events == [(1, "provider_unavailable"), (2, "provider_unavailable")]


def test_failing_the_same_attempt_again_gives_the_same_answer(conn, owner, thread) -> None:
    """The worker retries a store call whose answer was lost: the repeat must not read as news."""
    say(conn, owner, thread)
    [run] = claim(conn)
    assert fail(conn, run) == "queued"
    assert fail(conn, run) == "queued"
    assert fail(conn, run, "timeout") == "superseded"  # not this call: another code
    conn.execute("update assistant_runs set next_attempt_at = now() where id = %s", (run["run_id"],))
    [last] = claim(conn)
    conn.execute("update assistant_runs set max_attempts = 2 where id = %s", (run["run_id"],))
    assert fail(conn, last) == "failed"
    assert fail(conn, last) == "failed"
    assert fail(conn, run) == "superseded"
    assert conn.execute("select count(*) from assistant_messages where reply_to = %s", (run["message_id"],)).fetchone()[0] == 1


@pytest.mark.parametrize("ending", ["fail", "release"])
def test_a_run_cancelled_while_its_attempt_fails_or_is_given_back_is_not_queued_again(conn, owner, thread,
                                                                                      ending: str) -> None:
    """cancel_run flags a run in progress; if its attempt then fails (retryably) or is given back at
    shutdown before the worker acted on the flag, the run ends cancelled: no new prediction."""
    say(conn, owner, thread)
    [run] = claim(conn)
    with request(conn, postgrest.user("owner", owner), commit=True) as cur:
        assert cur.execute("select cancel_run(%s)", (run["run_id"],)).fetchone()[0] == "cancelling"
    if ending == "fail":
        assert fail(conn, run, p_retry_in_seconds=0) == "cancelled"
        assert fail(conn, run, p_retry_in_seconds=0) == "cancelled"  # the same call again: the same answer
    else:
        assert conn.execute("select release_run(%s, 'w1', %s)", (run["run_id"], run["attempt"])).fetchone()[0] is True
    row = run_row(conn, run["run_id"])
    assert (row["status"], row["last_error_code"], row["lease_owner"]) == ("cancelled", "cancelled", None)
    assert claim(conn) == []
    events = conn.execute("select attempt, status from assistant_inference_events where run_id = %s",
                          (run["run_id"],)).fetchall()
    assert events == [(1, "failed" if ending == "fail" else "cancelled")]


def test_a_late_failure_of_an_attempt_number_given_back_by_a_release_is_superseded(conn, owner, thread) -> None:
    """A release counts its attempt back, so a late worker's attempt number can be the run's
    again: its first report still does not read as news."""
    say(conn, owner, thread)
    [first] = claim(conn, "w1")
    assert fail(conn, first) == "queued"
    conn.execute("update assistant_runs set next_attempt_at = now() where id = %s", (first["run_id"],))
    [late] = claim(conn, "w2")
    expire_lease(conn, late["run_id"])
    [third] = claim(conn, "w3")
    assert conn.execute("select release_run(%s, 'w3', 3)", (third["run_id"],)).fetchone()[0]
    assert (run_row(conn, late["run_id"])["attempts"], late["attempt"]) == (2, 2)
    assert fail(conn, late) == "superseded"
    assert run_row(conn, late["run_id"])["status"] == "queued"


def test_a_lease_expired_on_the_last_attempt_fails_the_run(conn, owner, thread) -> None:
    say(conn, owner, thread)
    for _ in range(3):
        [run] = claim(conn)
        expire_lease(conn, run["run_id"])
    assert [(r["run_id"], r["blocked_code"], r["content"]) for r in claim(conn)] == \
        [(run["run_id"], "lease_expired", None)]  # ended by the claim: marked, nothing to work on
    row = run_row(conn, run["run_id"])
    assert row["status"] == "failed" and row["last_error_code"] == "lease_expired"
    assert conn.execute("select metadata_json->>'error_code' from assistant_messages where role = 'assistant'").fetchone()[0] == "lease_expired"
    # The last attempt's worker reports late: the run was not its to end.
    assert fail(conn, run) == "superseded"
    assert run_row(conn, run["run_id"])["last_error_code"] == "lease_expired"


def test_a_claim_with_nothing_due_changes_nothing(conn, owner, thread) -> None:
    # The short way out of claim_runs (nothing queued and due, no lease expired): a run held by
    # another worker and a run due later stay exactly as they were.
    say(conn, owner, thread)
    say(conn, owner, thread)
    [held, later] = claim(conn, "w1", limit=2)
    assert fail(conn, later, "rate_limited", p_retry_in_seconds=600) == "queued"
    state = ("select id, status, attempts, lease_owner, lease_expires_at, next_attempt_at, updated_at"
             " from assistant_runs order by id")
    before = conn.execute(state).fetchall()
    assert claim(conn, "w2") == []
    assert conn.execute(state).fetchall() == before
    assert run_row(conn, held["run_id"])["lease_owner"] == "w1"


def test_the_hot_worker_functions_plan_their_statements_once_per_session(conn) -> None:
    # Planned per call, claim_runs' statements cost 0.3-0.4 ms of database CPU each time (20261123000100).
    rows = conn.execute("""select p.proname, p.proconfig from pg_proc p
                            where p.pronamespace = 'public'::regnamespace
                              and p.proname in ('claim_runs', 'complete_run', 'complete_runs')""").fetchall()
    assert {name for name, _ in rows} == {"claim_runs", "complete_run", "complete_runs"}
    for name, config in rows:
        assert "plan_cache_mode=force_generic_plan" in config, name


def test_a_cancelled_run_whose_worker_died_ends_cancelled_at_the_next_claim(conn, owner, thread) -> None:
    # Nothing queued, one lease expired with attempts left and a cancel requested: the claim must
    # not take the short way out, and must not hand the run out again either.
    say(conn, owner, thread)
    [run] = claim(conn, "w1")
    conn.execute("update assistant_runs set cancel_requested_at = now() where id = %s", (run["run_id"],))
    expire_lease(conn, run["run_id"])
    assert [(r["run_id"], r["blocked_code"]) for r in claim(conn, "w2")] == [(run["run_id"], "cancelled")]
    row = run_row(conn, run["run_id"])
    assert row["status"] == "cancelled" and row["lease_owner"] is None
    # The attempt that lost its lease fails late: the claim counted the run, so this call says
    # superseded, not cancelled (20261123001900, 6).
    assert fail(conn, run) == "superseded"


def test_a_late_finish_of_a_cancelled_run_the_claim_ended_records_its_prediction_once(conn, owner, thread) -> None:
    """20261123001900, 6: the stalled attempt's own finish_cancelled comes after the claim ended
    the run cancelled (its event under the same attempt, without a prediction): the prediction
    and what it consumed go on that event and the user's usage, once."""
    say(conn, owner, thread)
    [run] = claim(conn, "w1")
    conn.execute("update assistant_runs set cancel_requested_at = now() where id = %s", (run["run_id"],))
    expire_lease(conn, run["run_id"])
    assert [r["blocked_code"] for r in claim(conn, "w2")] == ["cancelled"]
    before = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    consumed = psycopg.types.json.Jsonb({"attempt": 1, "model": MODEL, "prediction_id": "p9", "input_tokens": 100,
                                         "output_tokens": 20})
    for _ in range(2):  # the second call: its answer was lost on the way
        assert conn.execute("select finish_cancelled(%s, %s)", (run["run_id"], consumed)).fetchone()[0] is True
    events = conn.execute("select attempt, status, prediction_id, input_tokens, output_tokens"
                          " from assistant_inference_events where run_id = %s", (run["run_id"],)).fetchall()
    assert events == [(1, "cancelled", "p9", 100, 20)]
    after = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    tokens = {k: after[k] - before.get(k, 0) for k in after if k[0] == "tokens"}
    assert tokens and set(tokens.values()) == {120}  # every window of the token counter, once


def test_a_cancelled_prediction_s_consumption_is_recorded_once(conn, owner, thread) -> None:
    """record_cancelled_consumption: a run cancelled while its create was on its way gets the
    prediction and what it consumed on its cancelled event, and the tokens on the user's usage,
    once; an event that already names a prediction is left alone."""
    say(conn, owner, thread)
    [run] = claim(conn)
    conn.execute("select finish_cancelled(%s, %s)",
                 (run["run_id"], psycopg.types.json.Jsonb({"attempt": 1, "model": MODEL, "prediction_id": None})))
    before = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    consumed = psycopg.types.json.Jsonb({"attempt": 1, "model": MODEL, "prediction_id": "pred-late", "input_tokens": 40,
                                         "output_tokens": 2, "cost_usd": "0.00002"})
    record = "select record_cancelled_consumption(%s, %s)"
    assert conn.execute(record, (run["run_id"], consumed)).fetchone()[0] is True
    assert conn.execute(record, (run["run_id"], consumed)).fetchone()[0] is False  # once
    event = conn.execute("select status, model, prediction_id, input_tokens, output_tokens, cost_estimate_usd"
                         " from assistant_inference_events where run_id = %s", (run["run_id"],)).fetchone()
    assert event == ("cancelled", MODEL, "pred-late", 40, 2, Decimal("0.00002"))
    after = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    assert after[("tokens", "day")] == before.get(("tokens", "day"), 0) + 42
    assert after[("cost_usd", "day")] == before.get(("cost_usd", "day"), 0) + Decimal("0.00002")
    # Another attempt, or a run whose cancelled event already names its prediction: nothing.
    other = psycopg.types.json.Jsonb({"attempt": 2, "prediction_id": "pred-other", "output_tokens": 5})
    assert conn.execute(record, (run["run_id"], other)).fetchone()[0] is False
    assert {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()} == after


def test_finish_cancelled_counts_once_and_leaves_an_ended_run_alone(conn, owner, thread) -> None:
    """finish_cancelled called again for the same attempt (a worker cancelled while its
    completion was on its way, which complete_runs ended cancelled already), or for the attempt
    that completed the run, records and counts nothing more; another attempt's prediction (a
    worker whose run was taken over) is recorded and counted, and the run stays as it ended."""
    consumed = psycopg.types.json.Jsonb({"attempt": 1, "model": MODEL, "prediction_id": "pred-c", "input_tokens": 30,
                                         "output_tokens": 3, "cost_usd": "0.00001"})
    say(conn, owner, thread, "cancel me")
    [cancelled] = claim(conn)
    conn.execute("select finish_cancelled(%s, %s)", (cancelled["run_id"], consumed))
    after_cancel = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    assert after_cancel[("tokens", "day")] == 33
    conn.execute("select finish_cancelled(%s, %s)", (cancelled["run_id"], consumed))
    assert {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()} == after_cancel
    say(conn, owner, thread, "answer me")
    [answered] = claim(conn)
    complete(conn, answered)
    after_reply = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    conn.execute("select finish_cancelled(%s, %s)", (answered["run_id"], consumed))
    assert run_row(conn, answered["run_id"])["status"] == "completed"
    assert {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()} == after_reply
    events = conn.execute("select run_id, attempt, status from assistant_inference_events order by created_at").fetchall()
    assert events == [(cancelled["run_id"], 1, "cancelled"), (answered["run_id"], 1, "succeeded")]
    earlier = psycopg.types.json.Jsonb({"attempt": 2, "model": MODEL, "prediction_id": "pred-2", "output_tokens": 7})
    conn.execute("select finish_cancelled(%s, %s)", (answered["run_id"], earlier))
    assert run_row(conn, answered["run_id"])["status"] == "completed"
    counted = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    assert counted[("tokens", "day")] == after_reply[("tokens", "day")] + 7
    assert conn.execute("select status, prediction_id from assistant_inference_events where run_id = %s and attempt = 2",
                        (answered["run_id"],)).fetchone() == ("cancelled", "pred-2")


@pytest.mark.parametrize("consumed", [None, {}, {"attempt": 1}, {"prediction_id": "p"}, [1]])
def test_record_cancelled_consumption_says_what_it_needs(conn, owner, thread, consumed) -> None:
    say(conn, owner, thread)
    [run] = claim(conn)
    value = None if consumed is None else psycopg.types.json.Jsonb(consumed)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="object with attempt and prediction_id"):
        conn.execute("select record_cancelled_consumption(%s, %s)", (run["run_id"], value))


def test_cancelled_runs_names_runs_flagged_or_deleted(conn, owner, thread) -> None:
    first, second, third = (say(conn, owner, thread, f"m{i}") for i in range(3))
    runs = {r["message_id"]: r["run_id"] for r in claim(conn)}
    conn.execute("update assistant_runs set cancel_requested_at = now() where id = %s", (runs[first],))
    conn.execute("delete from assistant_messages where id = %s", (second,))
    ids = psycopg.types.json.Jsonb([str(r) for r in runs.values()])
    named = {r for (r,) in conn.execute("select run_id from cancelled_runs(%s)", (ids,)).fetchall()}
    assert named == {runs[first], runs[second]}


def test_a_deleted_run_s_prediction_is_charged_once(conn, owner, thread) -> None:
    """record_orphaned_consumption: what the prediction of a run deleted with its message
    consumed goes on a request_deleted event and the user's usage, once; nothing while the run
    exists, for a prediction whose reply was written before the deletion, or for a deleted user."""
    message = say(conn, owner, thread)
    [run] = claim(conn)
    consumed = {"attempt": 1, "model": MODEL, "prediction_id": "pred-gone", "input_tokens": 40, "output_tokens": 9,
                "cost_usd": "0.00003", "thread_id": str(thread)}
    record = "select record_orphaned_consumption(%s, %s, %s)"
    args = (run["run_id"], owner, psycopg.types.json.Jsonb(consumed))
    assert conn.execute(record, args).fetchone()[0] is False  # the run exists: its own functions record it
    before = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    conn.execute("delete from assistant_messages where id = %s", (message,))
    assert conn.execute(record, args).fetchone()[0] is True
    assert conn.execute(record, args).fetchone()[0] is False  # once
    event = conn.execute("select status, error_code, run_id, message_id, thread_id, prediction_id, input_tokens,"
                         " output_tokens, cost_estimate_usd from assistant_inference_events").fetchall()
    assert event == [("cancelled", "request_deleted", None, None, thread, "pred-gone", 40, 9, Decimal("0.00003"))]
    after = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    assert after[("tokens", "day")] == before.get(("tokens", "day"), 0) + 49
    assert after[("cost_usd", "day")] == before.get(("cost_usd", "day"), 0) + Decimal("0.00003")
    # A reply written before its message was deleted was charged by complete_run: not again.
    second = say(conn, owner, thread, "answered, then deleted")
    [run2] = claim(conn)
    complete(conn, run2, p_prediction_id="pred-answered")
    conn.execute("delete from assistant_messages where id = %s", (second,))
    again = {**consumed, "prediction_id": "pred-answered"}
    assert conn.execute(record, (run2["run_id"], owner, psycopg.types.json.Jsonb(again))).fetchone()[0] is False
    # Nobody left to charge.
    other = {**consumed, "prediction_id": "pred-nobody"}
    assert conn.execute(record, (run["run_id"], uuid.uuid4(), psycopg.types.json.Jsonb(other))).fetchone()[0] is False
    assert conn.execute("select count(*) from assistant_inference_events").fetchone()[0] == 2


@pytest.mark.parametrize("consumed", [None, {}, {"attempt": 1}, {"prediction_id": "p"}, ["p"]])
def test_record_orphaned_consumption_says_what_it_needs(conn, owner, consumed) -> None:
    value = None if consumed is None else psycopg.types.json.Jsonb(consumed)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="are required"):
        conn.execute("select record_orphaned_consumption(gen_random_uuid(), %s, %s)", (owner, value))


def test_an_abandoned_attempt_is_recorded_once_and_not_charged(conn, owner, thread) -> None:
    """record_abandoned_attempt: the attempt whose worker lost the lease gets a failed lease_lost
    event with what its prediction consumed, once; the user's usage is not touched; the run is
    left to the attempt that holds the lease, which answers with its own event."""
    say(conn, owner, thread)
    [first] = claim(conn, "w1")
    expire_lease(conn, first["run_id"])
    [second] = claim(conn, "w2")
    assert second["attempt"] == 2
    consumed = {"attempt": 1, "model": MODEL, "prediction_id": "pred-abandoned", "input_tokens": 40,
                "output_tokens": 3, "cost_usd": "0.000004"}
    record = "select record_abandoned_attempt(%s, %s)"
    before = conn.execute(COUNTERS, (owner,)).fetchall()
    assert conn.execute(record, (first["run_id"], psycopg.types.json.Jsonb(consumed))).fetchone()[0] is True
    assert conn.execute(record, (first["run_id"], psycopg.types.json.Jsonb(consumed))).fetchone()[0] is False  # once
    assert conn.execute(COUNTERS, (owner,)).fetchall() == before  # not the user's usage
    assert run_row(conn, first["run_id"])["status"] == "in_progress"  # the run is attempt 2's
    complete(conn, second, p_prediction_id="pred-second")
    events = conn.execute("select attempt, status, error_code, prediction_id, input_tokens, output_tokens,"
                          " cost_estimate_usd from assistant_inference_events order by attempt").fetchall()
    assert events[0] == (1, "failed", "lease_lost", "pred-abandoned", 40, 3, Decimal("0.000004"))
    assert [e[:4] for e in events] == [(1, "failed", "lease_lost", "pred-abandoned"),
                                       (2, "succeeded", None, "pred-second")]
    # An attempt that never left the starting line is recorded too, without a prediction.
    say(conn, owner, thread, "second message")
    [third] = claim(conn, "w1")
    expire_lease(conn, third["run_id"])
    claim(conn, "w2")
    nothing = {"attempt": 1, "model": "not_started", "prediction_id": None}
    assert conn.execute(record, (third["run_id"], psycopg.types.json.Jsonb(nothing))).fetchone()[0] is True
    # A run deleted meanwhile: nothing to record it on.
    conn.execute("delete from assistant_runs where id = %s", (third["run_id"],))
    assert conn.execute(record, (third["run_id"], psycopg.types.json.Jsonb({"attempt": 2}))).fetchone()[0] is False


@pytest.mark.parametrize("consumed", [None, {}, {"attempt": "1"}, {"prediction_id": "p"}, [1], {"attempt": 0}])
def test_record_abandoned_attempt_says_what_it_needs(conn, owner, thread, consumed) -> None:
    say(conn, owner, thread)
    [run] = claim(conn)
    value = None if consumed is None else psycopg.types.json.Jsonb(consumed)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="are required|start at 1"):
        conn.execute("select record_abandoned_attempt(%s, %s)", (run["run_id"], value))


def test_an_attempt_number_that_is_another_attempt_s_is_not_taken(conn, owner, thread) -> None:
    """The run's current attempt number while the run is open, or one beyond it (a release at
    shutdown gave the number back), belongs to the attempt that holds or will hold the lease: a
    late record of an abandoned attempt under that number records nothing, so that attempt's own
    event is not lost to the unique (run, attempt)."""
    say(conn, owner, thread)
    [run] = claim(conn, "w1")
    record = "select record_abandoned_attempt(%s, %s)"
    current = psycopg.types.json.Jsonb({"attempt": 1, "prediction_id": "p-stale"})
    assert conn.execute(record, (run["run_id"], current)).fetchone()[0] is False  # in progress on attempt 1
    assert conn.execute("select release_run(%s, 'w1', 1)", (run["run_id"],)).fetchone()[0] is True
    assert run_row(conn, run["run_id"])["attempts"] == 0  # given back: attempt 1 comes again
    assert conn.execute(record, (run["run_id"], current)).fetchone()[0] is False  # queued, beyond the count
    [again] = claim(conn, "w2")
    complete(conn, again, p_prediction_id="p-live")
    assert conn.execute("select attempt, status, prediction_id from assistant_inference_events").fetchall() == \
        [(1, "succeeded", "p-live")]


def test_release_gives_the_attempt_back(conn, owner, thread) -> None:
    say(conn, owner, thread)
    [run] = claim(conn, "w1")
    assert conn.execute("select release_run(%s, 'w2', %s)", (run["run_id"], run["attempt"])).fetchone()[0] is False
    assert conn.execute("select release_run(%s, 'w1', %s)", (run["run_id"], run["attempt"])).fetchone()[0] is True
    row = run_row(conn, run["run_id"])
    assert row["status"] == "queued" and row["attempts"] == 0
    assert claim(conn, "w2")[0]["attempt"] == 1


def test_extend_lease_only_for_the_holder(conn, owner, thread) -> None:
    say(conn, owner, thread)
    [run] = claim(conn, "w1", lease=10)
    assert conn.execute("select extend_lease(%s, 'w1', 1, 600)", (run["run_id"],)).fetchone()[0] is True
    remaining = conn.execute("select extract(epoch from lease_expires_at - now()) from assistant_runs").fetchone()[0]
    assert float(remaining) > 590
    assert conn.execute("select extend_lease(%s, 'w2', 1, 600)", (run["run_id"],)).fetchone()[0] is False
    assert conn.execute("select extend_lease(%s, 'w1', 2, 600)", (run["run_id"],)).fetchone()[0] is False


def test_queue_status(conn, owner, thread) -> None:
    assert conn.execute("select due_now, next_due_at, in_progress from run_queue_status()").fetchone() == (0, None, 0)
    say(conn, owner, thread)
    say(conn, owner, thread)
    due, next_due, in_progress = conn.execute("select * from run_queue_status()").fetchone()
    assert (due, in_progress) == (2, 0) and next_due is not None
    claim(conn, limit=1)
    assert conn.execute("select due_now, in_progress from run_queue_status()").fetchone() == (1, 1)


def test_claim_arguments_are_checked(conn) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_limit must be between 1 and 1000"):
        claim(conn, limit=0)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_lease_seconds"):
        claim(conn, lease=1)


def test_concurrent_claims_are_disjoint(db_url: str, conn, owner, thread) -> None:
    for i in range(40):
        say(conn, owner, thread, f"m{i}")
    claimed: list[list[uuid.UUID]] = []
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait()
            mine = []
            while rows := claim(c, name, limit=3):
                mine += [r["run_id"] for r in rows]
            claimed.append(mine)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [r for mine in claimed for r in mine]
    assert len(every) == 40 and len(set(every)) == 40


@pytest.mark.parametrize("call", [
    "select * from claim_runs('x')",
    "select complete_run(gen_random_uuid(), 1, 'x', 'm')",
    "select * from complete_runs('[{\"run_id\": \"00000000-0000-0000-0000-000000000000\"}]')",
    "select fail_attempt(gen_random_uuid(), 1, 'timeout')",
    "select release_run(gen_random_uuid(), 'x', 1)",
    "select extend_lease(gen_random_uuid(), 'x', 1)",
    "select * from run_queue_status()",
    "select assistant_finish_failed(gen_random_uuid(), 'timeout', 'x')",
    "select record_cancelled_consumption(gen_random_uuid(), '{}')",
    "select prune_usage_windows()",
    "select record_orphaned_consumption(gen_random_uuid(), gen_random_uuid(), '{}')",
    "select record_abandoned_attempt(gen_random_uuid(), '{\"attempt\": 1}')",
])
@pytest.mark.parametrize("actor", ["anon", "authenticated"])
def test_clients_cannot_call_worker_functions(conn, owner, call: str, actor: str) -> None:
    who = postgrest.anon() if actor == "anon" else postgrest.user("owner", owner)
    with request(conn, who) as cur:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function"):
            cur.execute(call)


def batch_item(run: dict, content: str = "An answer.", **extra) -> dict:
    return {"run_id": str(run["run_id"]), "attempt": run["attempt"], "content": content, "model": MODEL,
            "prediction_id": f"pred-{run['run_id']}", "input_tokens": 12, "output_tokens": 3, "cost_usd": "0.000005",
            "latency_ms": 250, "metadata": {"route": "chat"}, "follow_ups": ["More?"], **extra}


def complete_batch(conn: psycopg.Connection, items: list[dict]) -> dict:
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    rows = cur.execute("select * from complete_runs(%s)", (psycopg.types.json.Jsonb(items),)).fetchall()
    return {r["run_id"]: r["reply_id"] for r in rows}


def test_complete_runs_writes_what_complete_run_writes_for_each_run(conn, owner, thread) -> None:
    other = create_user(conn, email="other@example.com")
    other_thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (other,)).fetchone()[0]
    say(conn, owner, thread, "one")
    say(conn, owner, thread, "two")
    say(conn, other, other_thread, "three")
    runs = claim(conn)
    assert len(runs) == 3
    cancelled = runs[2]
    conn.execute("update assistant_runs set cancel_requested_at = now() where id = %s", (cancelled["run_id"],))
    replies = complete_batch(conn, [batch_item(r, f"answer {i}") for i, r in enumerate(runs)])
    assert set(replies) == {r["run_id"] for r in runs}
    assert replies[cancelled["run_id"]] is None  # cancelled meanwhile: no reply, as with complete_run
    for i, run in enumerate(runs[:2]):
        row = conn.execute("select content, reply_to, model, metadata_json from assistant_messages where id = %s",
                           (replies[run["run_id"]],)).fetchone()
        assert row == (f"answer {i}", run["message_id"], MODEL, {"route": "chat"})
        assert run_row(conn, run["run_id"])["status"] == "completed"
    assert run_row(conn, cancelled["run_id"])["status"] == "cancelled"
    events = conn.execute("select run_id, status, cost_estimate_usd from assistant_inference_events").fetchall()
    assert sorted(events) == sorted([(r["run_id"], "succeeded", Decimal("0.000005")) for r in runs[:2]]
                                    + [(cancelled["run_id"], "cancelled", Decimal("0.000005"))])
    assert conn.execute("select count(*) from assistant_follow_ups").fetchone()[0] == 2
    # Usage as two single completions would have counted it.
    used = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    assert used[("tokens", "day")] == 30 and used[("cost_usd", "month")] == Decimal("0.00001")
    # Repeating the batch changes nothing (usage included) and returns the same replies.
    assert complete_batch(conn, [batch_item(r, "again") for r in runs]) == replies
    assert conn.execute("select count(*) from assistant_messages where role = 'assistant'").fetchone()[0] == 2
    assert {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()} == used


def waiting_for_a_lock(conn: psycopg.Connection, pid: int, timeout: float = 10.0) -> None:
    """Until the backend `pid` waits for a lock (polled: the wait is the other session's)."""
    deadline = time.monotonic() + timeout
    while conn.execute("select wait_event_type from pg_stat_activity where pid = %s", (pid,)).fetchone()[0] != "Lock":
        assert time.monotonic() < deadline, "the batch never waited for the usage rows"
        time.sleep(0.01)


def test_complete_runs_locks_usage_in_user_order_with_runs_cancelled_meanwhile(db_url: str, conn) -> None:
    """A batch with a completed run of one user and a run of a later user cancelled meanwhile
    takes the usage rows in user order, like any other batch. Before, it counted the cancelled
    run first: against a batch that held the first user's usage and wanted the second's, a
    deadlock (PostgreSQL then fails one of them)."""
    first, second = sorted([create_user(conn, email="first@example.com"), create_user(conn, email="second@example.com")])
    threads = {u: conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (u,)).fetchone()[0]
               for u in (first, second)}
    for user in (first, second):
        say(conn, user, threads[user], "hello")
    runs = {r["user_id"]: r for r in claim(conn)}
    conn.execute("update assistant_runs set cancel_requested_at = now() where id = %s", (runs[second]["run_id"],))
    outcome: dict[str, object] = {}
    with psycopg.connect(db_url, autocommit=True) as batch, psycopg.connect(db_url) as other:
        other.execute("select ai_usage_add(%s, '{\"tokens\": 1}')", (first,))  # holds the first user's usage
        pid = batch.info.backend_pid

        def complete_the_batch() -> None:
            try:
                outcome["replies"] = complete_batch(batch, [batch_item(runs[first]), batch_item(runs[second])])
            except psycopg.Error as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=complete_the_batch)
        worker.start()
        try:
            waiting_for_a_lock(conn, pid)
            other.execute("select ai_usage_add(%s, '{\"tokens\": 1}')", (second,))  # then wants the second's
            other.commit()
        finally:
            worker.join(timeout=30)
    assert "error" not in outcome, outcome
    replies = outcome["replies"]
    assert replies[runs[second]["run_id"]] is None and replies[runs[first]["run_id"]] is not None
    assert run_row(conn, runs[second]["run_id"])["status"] == "cancelled"
    tokens = dict(conn.execute("select user_id, used from ai_usage_counters where metric = 'tokens'"
                               " and time_window = 'day'").fetchall())
    assert tokens == {first: 15 + 1, second: 15 + 1}


@pytest.mark.parametrize("batched", [False, True], ids=["complete_run", "complete_runs"])
def test_a_completion_locks_the_users_usage_before_the_thread(db_url: str, conn, owner, thread, batched: bool) -> None:
    """claim_runs, refusing a run at admission, locks the user's usage rows, then writes its
    refusal into the thread (updating the thread's row). A completion takes them in the same
    order: held up at the thread, it already holds the usage rows. Before, it wrote the reply
    first, and a completion and a refusal in one thread could wait on each other."""
    say(conn, owner, thread)
    [run] = claim(conn)
    outcome: dict[str, object] = {}
    with psycopg.connect(db_url) as holder, psycopg.connect(db_url, autocommit=True) as completer, \
            psycopg.connect(db_url) as probe:
        holder.execute("update assistant_threads set last_message_at = last_message_at where id = %s", (thread,))

        def complete_it() -> None:
            try:
                if batched:
                    outcome["replies"] = complete_batch(completer, [batch_item(run)])
                else:
                    outcome["replies"] = complete(completer, run)
            except psycopg.Error as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=complete_it)
        worker.start()
        try:
            waiting_for_a_lock(conn, completer.info.backend_pid)  # at the thread's row
            with pytest.raises(psycopg.errors.LockNotAvailable):
                probe.execute("select 1 from ai_usage_windows where user_id = %s for update nowait", (owner,))
        finally:
            holder.rollback()
            worker.join(timeout=30)
    assert "error" not in outcome, outcome
    assert run_row(conn, run["run_id"])["status"] == "completed"


def test_complete_runs_completes_a_run_named_twice_once(conn, owner, thread) -> None:
    """With its first element, as two complete_run calls would (the second, empty, is not looked at)."""
    say(conn, owner, thread, "one")
    [run] = claim(conn)
    cur = conn.cursor(row_factory=psycopg.rows.dict_row)
    rows = cur.execute("select * from complete_runs(%s)",
                       (psycopg.types.json.Jsonb([batch_item(run, "first"), batch_item(run, " ")]),)).fetchall()
    assert [r["run_id"] for r in rows] == [run["run_id"], run["run_id"]]  # a row per element, in order
    assert rows[0]["reply_id"] == rows[1]["reply_id"] is not None
    assert conn.execute("select content from assistant_messages where role = 'assistant'").fetchall() == [("first",)]
    assert conn.execute("select count(*) from assistant_inference_events").fetchone()[0] == 1
    assert conn.execute("select count(*) from assistant_follow_ups").fetchone()[0] == 1
    used = {(m, w): u for m, w, u in conn.execute(COUNTERS, (owner,)).fetchall()}
    assert used[("tokens", "hour")] == 15 and used[("cost_usd", "hour")] == Decimal("0.000005")


def test_complete_runs_writes_registered_actions_and_cuts_long_replies(conn, owner, thread) -> None:
    say(conn, owner, thread, "one")
    say(conn, owner, thread, "two")
    long_one, short_one = claim(conn)
    action_type = conn.execute("insert into assistant_action_types (name) values ('remind_me') returning name").fetchone()[0]
    replies = complete_batch(conn, [
        batch_item(long_one, "x" * 8005, follow_ups=["a", " ", "b", "c", "d"]),
        batch_item(short_one, "fine", actions=[{"type": action_type, "payload": {"k": 1}}, {"type": "unregistered"},
                                               {"type": action_type, "payload": "not an object"}]),
    ])
    content, metadata = conn.execute("select content, metadata_json from assistant_messages where id = %s",
                                     (replies[long_one["run_id"]],)).fetchone()
    assert len(content) == 8000 and metadata == {"route": "chat", "truncated": True, "original_length": 8005}
    assert conn.execute("select position, suggestion from assistant_follow_ups where message_id = %s order by 1",
                        (replies[long_one["run_id"]],)).fetchall() == [(1, "a"), (3, "b")]
    assert conn.execute("select message_id, action_type, payload, status from assistant_action_requests").fetchall() == [
        (replies[short_one["run_id"]], action_type, {"k": 1}, "pending")]


def test_complete_runs_fails_as_a_whole_and_changes_nothing(conn, owner, thread) -> None:
    say(conn, owner, thread, "one")
    say(conn, owner, thread, "two")
    good, gone = claim(conn)
    conn.execute("delete from assistant_runs where id = %s", (gone["run_id"],))
    with pytest.raises(psycopg.errors.NoDataFound, match="not found"):
        complete_batch(conn, [batch_item(good), batch_item(gone)])
    assert run_row(conn, good["run_id"])["status"] == "in_progress"
    assert conn.execute("select count(*) from assistant_messages where role = 'assistant'").fetchone()[0] == 0
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="cannot be empty"):
        complete_batch(conn, [batch_item(good, "  ")])


@pytest.mark.parametrize("bad", ["{}", "[]", "[1]", '[{"content": "no run"}]'])
def test_complete_runs_refuses_what_is_not_a_list_of_runs(conn, bad: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="p_runs must be|every element"):
        conn.execute("select * from complete_runs(%s::jsonb)", (bad,))


def test_a_batch_completion_does_not_scan_the_events_table_planned_while_it_was_small(conn, owner, thread) -> None:
    """20261123002000: complete_runs keeps one generic plan per connection, made at its first
    call. Made while assistant_inference_events was small (a new project), the look for each
    run's succeeded event was a hashed scan of the whole table, repeated at every call until the
    next ANALYZE. A run the call completes now answers from the call's own writes: no scan."""
    conn.execute("vacuum analyze assistant_inference_events")  # empty, as on a new project
    conn.execute("alter table assistant_inference_events set (autovacuum_enabled = false)")  # no ANALYZE meanwhile
    say(conn, owner, thread, "first")
    [first] = claim(conn)
    reply = complete_batch(conn, [batch_item(first)])[first["run_id"]]  # the plan is made here
    assert reply is not None
    # The table grows, without an ANALYZE (autovacuum's next one can be a minute away).
    conn.execute("""insert into assistant_inference_events (user_id, run_id, attempt, provider, model, status)
                    select %s, %s, g, 'replicate', 'm', 'succeeded' from generate_series(2, 2001) g""",
                 (owner, first["run_id"]))
    say(conn, owner, thread, "second")
    [second] = claim(conn)
    conn.execute("select pg_stat_force_next_flush()")  # the counts below are then this transaction's alone
    with conn.transaction():
        answered = complete_batch(conn, [batch_item(second), batch_item(first)])
        scans = conn.execute("select pg_stat_get_xact_numscans('public.assistant_inference_events'::regclass)").fetchone()[0]
    [new_reply] = conn.execute("select id from assistant_messages where reply_to = %s", (second["message_id"],)).fetchone()
    assert answered == {second["run_id"]: new_reply, first["run_id"]: reply}
    # The element of the run that had ended (the same call again) still looks its event up, and
    # that look was planned as the hashed scan of the whole table: what every element did before.
    assert scans == 1
    say(conn, owner, thread, "third")
    [third] = claim(conn)
    conn.execute("select pg_stat_force_next_flush()")
    with conn.transaction():
        assert complete_batch(conn, [batch_item(third)])[third["run_id"]] is not None
        scans = conn.execute("select pg_stat_get_xact_numscans('public.assistant_inference_events'::regclass)").fetchone()[0]
    assert scans == 0
