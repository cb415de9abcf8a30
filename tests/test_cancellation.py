"""A user cancels their own request, before or during the prediction."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

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
from worker.store import Completion, PostgresStore


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
    [event] = await query(db_url, "select status, prediction_id, model, input_tokens, output_tokens"
                                  " from assistant_inference_events")
    # No token counts come back for a canceled prediction: its prompt is estimated, nothing was
    # streamed of its reply.
    assert event["input_tokens"] > 0 and event["output_tokens"] == 0
    assert {k: event[k] for k in ("status", "prediction_id", "model")} == {
        "status": "cancelled", "prediction_id": prediction.id, "model": "meta/meta-llama-3-8b-instruct"}
    assert (await run_of(db_url, message))["lease_owner"] is None


async def test_a_cancelled_per_second_prediction_without_predict_time_is_priced_by_its_timestamps(
        db_url, simulator, public_images, monkeypatch) -> None:
    """A per-second model (the vision route) is billed for the time its prediction ran; a canceled
    prediction may come back without `predict_time`: its started_at … completed_at is priced."""
    from datetime import datetime
    from decimal import Decimal

    from worker.simulator import SimPrediction

    as_replicate = SimPrediction.to_json

    def without_predict_time(self: SimPrediction, now: float) -> dict[str, Any]:
        body = as_replicate(self, now)
        if body["status"] == "canceled":
            body["metrics"].pop("predict_time")
        return body

    monkeypatch.setattr(SimPrediction, "to_json", without_predict_time)
    simulator.latency = 30
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, replicate_prefer_wait_seconds=1)
    async with running_worker(settings, db_url):
        message = await say(db_url, user, thread, "what is in this picture?", "https://images.example/cat.jpg")
        await wait_until(checking(lambda: [r for r in simulator.requests if r.method == "GET"]),
                         what="the prediction to be under way")
        run = await run_of(db_url, message)
        await as_user(db_url, user, "select cancel_run(%s) as status", (run["id"],))
        await wait_until(lambda: query(db_url, "select 1 from assistant_inference_events where status = 'cancelled'"
                                               " and prediction_id is not null"), timeout=10, what="the cancellation")
    [prediction] = simulator.predictions.values()
    canceled = prediction.to_json(time.time())
    assert canceled["status"] == "canceled" and "predict_time" not in canceled["metrics"]
    ran = datetime.fromisoformat(canceled["completed_at"]) - datetime.fromisoformat(canceled["started_at"])
    [event] = await query(db_url, "select model, cost_estimate_usd from assistant_inference_events")
    assert event["model"] == "yorickvp/llava-13b"
    expected = (Decimal(str(ran.total_seconds())) * Decimal("0.000725")).quantize(Decimal("0.000001"))
    assert event["cost_estimate_usd"] == expected > 0
    [used] = await query(db_url, "select used from ai_usage_counters where user_id = %s and metric = 'cost_usd'"
                                 " and time_window = 'day'", (user,))
    assert used["used"] == expected


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


async def held_create(db_url: str, simulator, user, thread, content: str):
    """A message whose prediction's create is held by Prefer: wait (replies not streamed),
    the prediction running until the test ends it."""
    message = await say(db_url, user, thread, content)
    await wait_until(checking(lambda: len(simulator.predictions) == 1), what="the create to be held")
    [prediction] = simulator.predictions.values()
    return message, prediction


@pytest.mark.parametrize("ending", ["ended", "still-running"])
async def test_a_request_cancelled_during_its_held_create_is_charged_and_its_prediction_cancelled(
        db_url, simulator, ending: str) -> None:
    """Cancelled while the create is held by Prefer: wait, the run ends at once; the worker
    lets the create answer, cancels the prediction at Replicate if it is still running, and
    records what it consumed (or, for a prediction cancelled still running, an estimate of its
    prompt) on the run's event and the user's usage: cancelling early gives no free tokens, and
    no prediction runs on unknown."""
    simulator.latency = 600.0  # ended, or let go, by hand
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, replicate_prefer_wait_seconds=60)
    async with running_worker(settings, db_url) as worker:
        message, prediction = await held_create(db_url, simulator, user, thread, "cancel me while you think")
        run = await run_of(db_url, message)
        [result] = await as_user(db_url, user, "select cancel_run(%s) as status", (run["id"],))
        assert result["status"] == "cancelling"
        await wait_until(lambda: query(db_url, "select 1 from assistant_runs where status = 'cancelled'"),
                         what="the cancellation")
        # Ended while the create is still held: the model is known, the prediction not yet.
        assert prediction.status(time.time()) == "processing"
        [event] = await query(db_url, "select prediction_id, model from assistant_inference_events")
        assert event == {"prediction_id": None, "model": "meta/meta-llama-3-8b-instruct"}
        if ending == "ended":
            prediction.end_now()  # the held create answers with the prediction succeeded
        else:
            prediction.answer_now.set()  # it answers with the prediction still running
        await wait_until(lambda: query(db_url, "select 1 from assistant_inference_events where prediction_id is not null"),
                         what="the prediction to be recorded")
    [event] = await query(db_url, "select status, prediction_id, input_tokens, output_tokens, cost_estimate_usd"
                                  " from assistant_inference_events")
    assert (event["status"], event["prediction_id"]) == ("cancelled", prediction.id)
    cancels = [r for r in simulator.requests if r.path.endswith("/cancel")]
    counters = await query(db_url, "select used from ai_usage_counters where user_id = %s and metric = 'tokens'"
                                    " and time_window = 'day'", (user,))
    if ending == "ended":
        assert prediction.canceled_at is None and cancels == []  # nothing left to cancel
        assert event["output_tokens"] == len(prediction.tokens) > 0 and event["input_tokens"] > 0
        assert event["cost_estimate_usd"] > 0
        assert counters == [{"used": event["input_tokens"] + event["output_tokens"]}]
        assert worker.metrics.registry.get_sample_value(
            "assistant_cost_usd_total", {"model": "meta/meta-llama-3-8b-instruct"}) == float(event["cost_estimate_usd"])
    else:
        assert prediction.canceled_at is not None and len(cancels) == 1
        # Replicate reports no token counts for a canceled prediction: the prompt it read is
        # estimated (nothing was streamed of its reply), so cancelling is no way around a budget.
        assert event["output_tokens"] == 0 and event["input_tokens"] > 0
        assert counters == [{"used": event["input_tokens"]}]
    assert await query(db_url, "select * from assistant_messages where reply_to = %s", (message,)) == []
    assert worker.counts["cancelled"] == 1


async def test_shutdown_past_its_grace_cancels_a_held_create_s_prediction_once_it_answers(db_url, simulator) -> None:
    """Shutdown past the grace period gives back a run whose create is held, at once; before it
    exits, the worker waits for the create to answer and cancels the prediction at Replicate."""
    simulator.latency = 600.0
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, replicate_prefer_wait_seconds=60, worker_shutdown_grace_seconds=0)
    async with running_worker(settings, db_url) as worker:
        message, prediction = await held_create(db_url, simulator, user, thread, "stop while I wait")
        worker.stop()
        await wait_until(lambda: query(db_url, "select 1 from assistant_runs where status = 'queued' and attempts = 0"),
                         what="the run to be given back")
        await wait_until(checking(lambda: worker.provider.settling), what="the worker to wait for the create")
        assert prediction.canceled_at is None
        prediction.answer_now.set()  # the create answers, the prediction still running
    assert worker.provider.settling == set()
    assert prediction.canceled_at is not None
    [run] = await query(db_url, "select status, attempts, lease_owner from assistant_runs")
    assert run == {"status": "queued", "attempts": 0, "lease_owner": None}
    assert worker.counts["released"] == 1


class CompletionHeldBack(PostgresStore):
    """The worker's store, with its completions held until the test lets them go; a
    finish_cancelled, if the worker makes one, goes to the database only after the completion
    has (the order in which it would count twice)."""

    let_go: asyncio.Event
    held: asyncio.Event
    flagged: asyncio.Event
    completed: asyncio.Event

    def hold(self) -> CompletionHeldBack:
        self.let_go, self.held, self.flagged, self.completed = (asyncio.Event() for _ in range(4))
        return self

    async def complete(self, completion: Completion) -> uuid.UUID | None:
        self.held.set()
        await self.let_go.wait()
        try:
            return await super().complete(completion)
        finally:
            self.completed.set()

    async def cancelled_runs(self, run_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        flagged = await super().cancelled_runs(run_ids)
        if flagged:
            self.flagged.set()
        return flagged

    async def finish_cancelled(self, run: Any, consumed: dict[str, Any] | None) -> bool:
        await self.completed.wait()
        return await super().finish_cancelled(run, consumed)


async def test_a_request_cancelled_while_its_reply_is_being_written_is_counted_once(db_url, simulator) -> None:
    """The prediction has succeeded and its reply is on its way to the database when the user
    cancels. The worker lets the write through (complete_runs ends the run cancelled and counts
    what the prediction consumed); it does not cancel the run as well, which counted it twice."""
    user, thread = await new_user_thread(db_url)
    store = (await CompletionHeldBack.connect(db_url)).hold()
    try:
        async with running_worker(worker_settings(simulator.base_url), db_url, store=store) as worker:
            message = await say(db_url, user, thread, "answer, then be cancelled")
            await wait_until(checking(store.held.is_set), what="the reply to be on its way")
            [result] = await as_user(db_url, user, "select cancel_run(%s) as status", ((await run_of(db_url, message))["id"],))
            assert result["status"] == "cancelling"
            await wait_until(checking(store.flagged.is_set), what="the worker to see the cancellation")
            store.let_go.set()
            await wait_until(lambda: query(db_url, "select 1 from assistant_runs where status = 'cancelled'"),
                             what="the run to end")
            await wait_until(checking(lambda: not worker.inflight), what="the worker to be done with it")
    finally:
        await store.close()
    [event] = await query(db_url, "select status, input_tokens, output_tokens from assistant_inference_events")
    assert event["status"] == "cancelled" and event["output_tokens"] > 0
    [tokens] = await query(db_url, "select used from ai_usage_counters where user_id = %s and metric = 'tokens'"
                                   " and time_window = 'day'", (user,))
    assert tokens["used"] == event["input_tokens"] + event["output_tokens"]
    assert await query(db_url, "select * from assistant_messages where reply_to = %s", (message,)) == []
    assert (worker.counts["ended_meanwhile"], worker.counts["cancelled"], worker.counts["completed"]) == (1, 0, 0)
    [cost] = await query(db_url, "select cost_estimate_usd from assistant_inference_events")
    assert worker.metrics.registry.get_sample_value(
        "assistant_cost_usd_total", {"model": "meta/meta-llama-3-8b-instruct"}) == float(cost["cost_estimate_usd"])


async def test_shutdown_past_its_grace_lets_a_reply_on_its_way_through(db_url, simulator, caplog) -> None:
    """A reply being written when the grace period ends is written: the run is not given back
    (which threw the paid answer away and asked the model again)."""
    user, thread = await new_user_thread(db_url)
    store = (await CompletionHeldBack.connect(db_url)).hold()
    caplog.set_level("INFO", logger="worker.pipeline")
    settings = worker_settings(simulator.base_url, worker_shutdown_grace_seconds=0)
    try:
        async with running_worker(settings, db_url, store=store) as worker:
            message = await say(db_url, user, thread, "answer me as you stop")
            await wait_until(checking(store.held.is_set), what="the reply to be on its way")
            worker.stop()
            await wait_until(checking(lambda: any(getattr(r, "event", None) == "worker.grace_over" for r in caplog.records)),
                             what="the grace period to end")
            [over] = [r for r in caplog.records if getattr(r, "event", None) == "worker.grace_over"]
            assert (over.cancelled, over.replies_let_through) == (0, 1)
            store.let_go.set()
    finally:
        await store.close()
    [run] = await query(db_url, "select status, attempts from assistant_runs")
    assert (run["status"], run["attempts"]) == ("completed", 1)
    assert len(await query(db_url, "select * from assistant_messages where reply_to = %s", (message,))) == 1
    assert (worker.counts["completed"], worker.counts["released"]) == (1, 0)


class FinishHeldBack(PostgresStore):
    """The worker's store, with the end of a cancelled run held until the test lets it go."""

    let_go: asyncio.Event
    held: asyncio.Event

    def hold(self) -> FinishHeldBack:
        self.let_go, self.held = asyncio.Event(), asyncio.Event()
        return self

    async def finish_cancelled(self, run: Any, consumed: dict[str, Any] | None) -> bool:
        self.held.set()
        await self.let_go.wait()
        return await super().finish_cancelled(run, consumed)


async def test_a_cancellation_being_recorded_survives_shutdown(db_url, simulator, caplog) -> None:
    """Shutdown past its grace period comes while a cancelled run's end is being written and its
    held create has not answered: the worker still ends the run, waits for the create, cancels
    the prediction and records it before it exits."""
    simulator.latency = 600.0
    user, thread = await new_user_thread(db_url)
    store = (await FinishHeldBack.connect(db_url)).hold()
    caplog.set_level("INFO", logger="worker.pipeline")
    settings = worker_settings(simulator.base_url, replicate_prefer_wait_seconds=60, worker_shutdown_grace_seconds=0)
    logged = lambda event: any(getattr(r, "event", None) == event for r in caplog.records)  # noqa: E731
    try:
        async with running_worker(settings, db_url, store=store) as worker:
            message, prediction = await held_create(db_url, simulator, user, thread, "cancel, then stop")
            await as_user(db_url, user, "select cancel_run(%s)", ((await run_of(db_url, message))["id"],))
            await wait_until(checking(store.held.is_set), what="the cancellation to be on its way")
            worker.stop()
            await wait_until(checking(lambda: logged("worker.settling")), what="the worker to wait for what is left")
            store.let_go.set()
            await wait_until(lambda: query(db_url, "select 1 from assistant_runs where status = 'cancelled'"),
                             what="the run to end")
            prediction.answer_now.set()  # the held create answers, the prediction still running
    finally:
        await store.close()
    assert prediction.canceled_at is not None
    [event] = await query(db_url, "select status, prediction_id, input_tokens from assistant_inference_events")
    assert (event["status"], event["prediction_id"]) == ("cancelled", prediction.id) and event["input_tokens"] > 0
    assert worker.counts["cancelled"] == 1 and not logged("worker.settle_abandoned")


async def deleted_request_charges(db_url: str, user: uuid.UUID) -> tuple[dict, dict]:
    """The deleted request's event, and the user's day of usage."""
    [event] = await query(db_url, "select status, error_code, run_id, message_id, thread_id, prediction_id, model,"
                                  " input_tokens, output_tokens, cost_estimate_usd from assistant_inference_events")
    [day] = await query(db_url, "select messages, tokens, cost_usd from ai_usage_windows"
                                " where user_id = %s and time_window = 'day'", (user,))
    return event, day


@pytest.mark.parametrize("deleted", ["message", "thread"])
@pytest.mark.parametrize("hint", ["notify", "poll"])
async def test_a_request_deleted_while_the_model_writes_is_stopped_and_charged(db_url, simulator, deleted: str,
                                                                               hint: str) -> None:
    """Deleting the message (or its thread) deletes its run. The worker stops the prediction as it
    would for a cancellation, and charges what it consumed: deleting is no free way to cancel."""
    simulator.latency = 30
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.2)
    wakeups = NoWakeups() if hint == "poll" else None  # without NOTIFY the worker looks every second
    async with running_worker(settings, db_url, wakeups=wakeups, stream=True) as worker:
        message = await say(db_url, user, thread, "a long answer please")
        await wait_until(checking(lambda: any(p.status(time.time()) == "processing"
                                              for p in simulator.predictions.values())),
                         what="the prediction to be under way")
        await wait_until(checking(lambda: [r for r in simulator.requests if r.path.startswith("/v1/streams/")]),
                         what="the stream to be read")
        table, row = ("assistant_messages", message) if deleted == "message" else ("assistant_threads", thread)
        await as_user(db_url, user, f"delete from {table} where id = %s", (row,))
        await wait_until(lambda: query(db_url, "select 1 from assistant_inference_events"), timeout=10,
                         what="the deleted request to be charged")
    [prediction] = simulator.predictions.values()
    assert prediction.canceled_at is not None
    assert (worker.counts["gone"], worker.counts["cancelled"], worker.counts["completed"]) == (1, 0, 0)
    event, day = await deleted_request_charges(db_url, user)
    assert {k: event[k] for k in ("status", "error_code", "run_id", "message_id", "prediction_id", "model")} == {
        "status": "cancelled", "error_code": "request_deleted", "run_id": None, "message_id": None,
        "prediction_id": prediction.id, "model": "meta/meta-llama-3-8b-instruct"}
    assert event["thread_id"] == (thread if deleted == "message" else None)
    assert event["input_tokens"] > 0 and event["cost_estimate_usd"] > 0
    assert (day["messages"], day["tokens"], day["cost_usd"]) == (
        1, event["input_tokens"] + event["output_tokens"], event["cost_estimate_usd"])
    assert worker.metrics.registry.get_sample_value(
        "assistant_cost_usd_total", {"model": "meta/meta-llama-3-8b-instruct"}) == float(event["cost_estimate_usd"])
    assert worker.metrics.registry.get_sample_value("assistant_runs_cancelled_total") == 0


async def test_a_request_deleted_while_its_reply_is_written_is_charged_once(db_url, simulator) -> None:
    """The prediction has succeeded and its reply is on its way when the user deletes the message:
    the write finds the run gone, and the reply the user was streamed is charged all the same."""
    user, thread = await new_user_thread(db_url)
    store = (await CompletionHeldBack.connect(db_url)).hold()
    try:
        async with running_worker(worker_settings(simulator.base_url), db_url, store=store) as worker:
            message = await say(db_url, user, thread, "answer, then be deleted")
            await wait_until(checking(store.held.is_set), what="the reply to be on its way")
            await as_user(db_url, user, "delete from assistant_messages where id = %s", (message,))
            await wait_until(checking(store.flagged.is_set), what="the worker to see the deletion")
            store.let_go.set()
            await wait_until(checking(lambda: not worker.inflight), what="the worker to be done with it")
    finally:
        await store.close()
    [prediction] = simulator.predictions.values()
    event, day = await deleted_request_charges(db_url, user)
    assert (event["error_code"], event["prediction_id"]) == ("request_deleted", prediction.id)
    metrics = prediction.to_json(time.time())["metrics"]  # the prediction's own counts
    assert (event["input_tokens"], event["output_tokens"]) == (metrics["input_token_count"], metrics["output_token_count"])
    assert (day["tokens"], day["cost_usd"]) == (event["input_tokens"] + event["output_tokens"], event["cost_estimate_usd"])
    assert await query(db_url, "select * from assistant_messages") == []
    assert (worker.counts["gone"], worker.counts["completed"]) == (1, 0)
    assert not [k for k in worker.counts if k.startswith("failed.")]  # not mistaken for a failure
