"""A worker whose lease on a run is no longer its own stops that attempt: its prediction is
cancelled at Replicate, the attempt is recorded on a failed `lease_lost` event (not charged to
the user), and the attempt that holds the lease answers, once. Covers the worker claiming its own expired run again (the old attempt was left running and
its end dropped the new attempt from the worker's books) and a run taken over by another worker."""

from __future__ import annotations

import asyncio

import psycopg

from tests.pipeline_helpers import checking, new_user_thread, query, running_worker, say, wait_until, worker_settings


async def _under_way(db_url: str, simulator, message) -> dict:
    await wait_until(checking(lambda: simulator.predictions), what="the first prediction")
    [run] = await query(db_url, "select * from assistant_runs where message_id = %s", (message,))
    assert (run["status"], run["attempts"]) == ("in_progress", 1)
    return run


async def _lease_runs_out(db_url: str, run_id) -> None:
    """The run's lease expires (as after a long stall of the worker's event loop) and the worker
    is woken to claim: the claim hands the run to it again, as a new attempt."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("update assistant_runs set lease_expires_at = now() - interval '1 second' where id = %s",
                           (run_id,))
        await conn.execute("select pg_notify('assistant_runs', %s)", (str(run_id),))


async def _handed_back_while_writing(db_url: str, store, message) -> dict:
    """Once the first attempt is writing its (held) reply, its lease runs out and the claim hands
    the run back as attempt 2; the run as it was before."""
    await asyncio.wait_for(store.held.wait(), 15)  # the first attempt is writing its reply
    [run] = await query(db_url, "select * from assistant_runs where message_id = %s", (message,))
    await _lease_runs_out(db_url, run["id"])
    await wait_until(lambda: query(db_url, "select 1 from assistant_runs where id = %s and attempts = 2",
                                   (run["id"],)), what="the claim to hand the run over again")
    return run


async def test_a_worker_that_claims_its_own_expired_run_again_abandons_the_old_attempt(db_url, simulator) -> None:
    simulator.latency = 60  # the first attempt would take a minute
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.2, replicate_prefer_wait_seconds=1)
    async with running_worker(settings, db_url) as worker:
        message = await say(db_url, user, thread, "hello?")
        run = await _under_way(db_url, simulator, message)
        [first] = simulator.predictions.values()
        simulator.latency = 0.05  # the attempt that takes over answers at once
        # Its lease runs out (as after a long stall of the event loop) and the claim hands the run
        # to the same worker again, as attempt 2.
        await _lease_runs_out(db_url, run["id"])
        await wait_until(lambda: query(db_url, "select 1 from assistant_runs where id = %s and status = 'completed'",
                                       (run["id"],)), what="the second attempt to answer")
        await wait_until(checking(lambda: first.canceled_at is not None), what="the first prediction to be cancelled")
        await wait_until(checking(lambda: not worker.inflight), what="the worker's books to empty")
    assert worker.counts["abandoned"] == 1
    assert worker.metrics.registry.get_sample_value("assistant_attempts_abandoned_total") == 1
    [done] = await query(db_url, "select status, attempts from assistant_runs where id = %s", (run["id"],))
    assert done == {"status": "completed", "attempts": 2}
    replies = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert len(replies) == 1
    events = await query(db_url, "select attempt, status, error_code, prediction_id, cost_estimate_usd > 0 as paid"
                                 " from assistant_inference_events where run_id = %s order by attempt", (run["id"],))
    [second] = [p for p in simulator.predictions.values() if p is not first]
    # The abandoned attempt is on an event of its own, with what its cancelled prediction consumed.
    assert events == [{"attempt": 1, "status": "failed", "error_code": "lease_lost", "prediction_id": first.id,
                       "paid": True},
                      {"attempt": 2, "status": "succeeded", "error_code": None, "prediction_id": second.id,
                       "paid": True}]
    assert len(simulator.predictions) == 2
    # The user's usage counts the reply they were given, not the abandoned attempt.
    [usage] = await query(db_url, "select w.tokens, e.input_tokens + e.output_tokens as replied"
                                  " from ai_usage_windows w, assistant_inference_events e"
                                  " where w.user_id = %s and w.time_window = 'day' and e.run_id = %s and e.attempt = 2",
                          (user, run["id"]))
    assert usage["tokens"] == usage["replied"]


async def test_a_worker_whose_run_was_taken_over_stops_its_attempt(db_url, simulator) -> None:
    """The lease is renewed every third of WORKER_LEASE_SECONDS; when renewal finds the run
    another worker's, this worker cancels its prediction and leaves the run alone."""
    simulator.latency = 60
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, worker_lease_seconds=10, replicate_prefer_wait_seconds=1)
    async with running_worker(settings, db_url) as worker:
        message = await say(db_url, user, thread, "hello?")
        run = await _under_way(db_url, simulator, message)
        [prediction] = simulator.predictions.values()
        taken = await query(db_url, "update assistant_runs set lease_owner = 'another-worker', attempts = 2,"
                                    " lease_expires_at = now() + interval '1 hour' where id = %s returning id", (run["id"],))
        assert taken
        await wait_until(checking(lambda: prediction.canceled_at is not None), timeout=20,
                         what="the renewal to find the lease lost and the prediction to be cancelled")
        await wait_until(checking(lambda: not worker.inflight), what="the attempt to stop")
    assert worker.counts["abandoned"] == 1 and worker.counts["released"] == 0
    [left] = await query(db_url, "select status, lease_owner, attempts from assistant_runs where id = %s", (run["id"],))
    assert left == {"status": "in_progress", "lease_owner": "another-worker", "attempts": 2}  # untouched
    assert await query(db_url, "select 1 from assistant_messages where reply_to = %s", (message,)) == []
    events = await query(db_url, "select run_id, attempt, status, error_code, prediction_id from assistant_inference_events")
    assert events == [{"run_id": run["id"], "attempt": 1, "status": "failed", "error_code": "lease_lost",
                       "prediction_id": prediction.id}]


async def test_a_reclaimed_run_whose_reply_is_being_written_is_not_asked_again(db_url, simulator) -> None:
    """The claim hands the worker its own run again while the first attempt's reply is on its
    way to the database: that attempt is not abandoned, and the new one waits for it and, the
    run being answered, makes no prediction of its own."""
    from tests.test_cancellation import CompletionHeldBack

    simulator.latency = 0.05
    user, thread = await new_user_thread(db_url)
    store = (await CompletionHeldBack.connect(db_url)).hold()
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.2)
    try:
        async with running_worker(settings, db_url, store=store) as worker:
            message = await say(db_url, user, thread, "hello?")
            run = await _handed_back_while_writing(db_url, store, message)
            store.let_go.set()
            await wait_until(lambda: query(db_url, "select 1 from assistant_runs where id = %s and status = 'completed'",
                                           (run["id"],)), what="the first attempt's reply")
            await wait_until(checking(lambda: not worker.inflight), what="both attempts to end")
    finally:
        await store.close()
    assert worker.counts["abandoned"] == 0
    assert len(simulator.creates) == 1  # the second attempt asked nothing of Replicate
    assert len(await query(db_url, "select 1 from assistant_messages where reply_to = %s", (message,))) == 1


async def test_a_reclaimed_run_waiting_at_shutdown_makes_no_prediction(db_url, simulator) -> None:
    """The worker is stopped while the new attempt waits for the earlier one, whose reply then
    fails to be written: the new attempt makes no prediction during shutdown and gives the run
    back to the queue for the next worker."""
    from tests.test_cancellation import CompletionHeldBack

    class CompletionFails(CompletionHeldBack):
        async def complete(self, completion):  # held, then refused: the earlier attempt does not answer
            self.held.set()
            await self.let_go.wait()
            raise RuntimeError("the reply could not be written")

    simulator.latency = 0.05
    user, thread = await new_user_thread(db_url)
    store = (await CompletionFails.connect(db_url)).hold()
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.2, worker_shutdown_grace_seconds=5)
    try:
        async with running_worker(settings, db_url, store=store) as worker:
            message = await say(db_url, user, thread, "hello?")
            run = await _handed_back_while_writing(db_url, store, message)
            worker.stop()  # shutdown begins while the new attempt waits
            store.let_go.set()
        # running_worker waited for the worker to end
    finally:
        await store.close()
    assert len(simulator.creates) == 1  # no new prediction during shutdown
    assert worker.counts["released"] == 1
    [left] = await query(db_url, "select status, lease_owner from assistant_runs where id = %s", (run["id"],))
    assert left == {"status": "queued", "lease_owner": None}  # for the next worker
    assert await query(db_url, "select 1 from assistant_messages where reply_to = %s", (message,)) == []
