"""A user cancels their own request, before or during the prediction."""

from __future__ import annotations


import psycopg.errors
import pytest

from tests.pipeline_helpers import (
    NoWakeups,
    as_user,
    checking,
    new_user_thread,
    query,
    running_worker,
    say,
    wait_until,
    worker_settings,
)


async def run_of(db_url: str, message) -> dict:
    [run] = await query(db_url, "select * from assistant_runs where message_id = %s", (message,))
    return run


async def test_cancelling_before_the_prediction_sends_nothing_and_charges_nothing(db_url, simulator) -> None:
    user, thread = await new_user_thread(db_url, plan="free")
    message = await say(db_url, user, thread, "never mind")
    run = await run_of(db_url, message)
    [result] = await as_user(db_url, user, "select cancel_run(%s) as status", (run["id"],))
    assert result["status"] == "cancelled"
    async with running_worker(worker_settings(simulator.base_url), db_url):
        await say(db_url, user, thread, "this one counts")
        await wait_until(lambda: query(db_url, "select 1 from assistant_runs where status = 'completed'"), what="the other run")
    assert len(simulator.creates) == 1
    cancelled = await run_of(db_url, message)
    assert (cancelled["status"], cancelled["last_error_code"]) == ("cancelled", "cancelled")
    assert await query(db_url, "select * from assistant_messages where reply_to = %s", (message,)) == []
    [event] = await query(db_url, "select status, model, error_code from assistant_inference_events where message_id = %s",
                          (message,))
    assert event == {"status": "cancelled", "model": "not_started", "error_code": "cancelled"}
    [used] = await query(db_url, "select used from ai_usage_counters where user_id = %s and metric = 'messages'"
                                 " and time_window = 'day'", (user,))
    assert used["used"] == 1  # only the message that was answered


@pytest.mark.parametrize("hint", ["notify", "poll"])
async def test_cancelling_during_the_prediction_cancels_it_at_replicate(db_url, simulator, hint: str) -> None:
    simulator.latency = 30
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.2, replicate_prefer_wait_seconds=1)
    wakeups = NoWakeups() if hint == "poll" else None  # without NOTIFY the worker looks every second
    async with running_worker(settings, db_url, wakeups=wakeups) as worker:
        message = await say(db_url, user, thread, "a long answer please")
        await wait_until(checking(lambda: [r for r in simulator.requests if r.method == "GET"]),
                         what="the prediction to be under way")
        run = await run_of(db_url, message)
        [result] = await as_user(db_url, user, "select cancel_run(%s) as status", (run["id"],))
        assert result["status"] == "cancelling"
        await wait_until(lambda: query(db_url, "select 1 from assistant_runs where status = 'cancelled'"),
                         timeout=10, what="the cancellation")
    # Read after the worker stopped: the database shows the cancellation a moment before the
    # worker's own bookkeeping does.
    assert worker.counts["cancelled"] == 1
    assert worker.metrics.registry.get_sample_value("assistant_runs_cancelled_total") == 1
    [prediction] = simulator.predictions.values()
    assert prediction.canceled_at is not None
    assert await query(db_url, "select * from assistant_messages where reply_to = %s", (message,)) == []
    [event] = await query(db_url, "select status, prediction_id, model from assistant_inference_events")
    assert event == {"status": "cancelled", "prediction_id": prediction.id, "model": "meta/meta-llama-3-8b-instruct"}
    assert (await run_of(db_url, message))["lease_owner"] is None


async def test_users_cancel_only_their_own_requests_that_are_still_open(db_url, simulator) -> None:
    user, thread = await new_user_thread(db_url)
    other, _ = await new_user_thread(db_url)
    message = await say(db_url, user, thread, "mine")
    run = await run_of(db_url, message)
    with pytest.raises(psycopg.errors.NoDataFound, match="not found"):
        await as_user(db_url, other, "select cancel_run(%s)", (run["id"],))
    async with running_worker(worker_settings(simulator.base_url), db_url):
        await wait_until(lambda: query(db_url, "select 1 from assistant_runs where status = 'completed'"), what="the reply")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"already ended \(completed\)"):
        await as_user(db_url, user, "select cancel_run(%s)", (run["id"],))
