"""End to end on the postgres transport: real database, the worker, Replicate answered by the
local simulator over HTTP with the documented JSON shapes."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import uuid
from collections import Counter
from decimal import Decimal

import pytest

from tests.conftest import PROJECT_DIR
from tests.pipeline_helpers import (
    checking,
    NoWakeups,
    finished_runs,
    new_user_thread,
    query,
    running_worker,
    say,
    wait_until,
    worker_settings,
)
from worker.simulator import Fault, ReplicateSimulator
from worker.store import PostgresStore


async def test_chat_message_gets_its_reply_event_and_numbers(db_url: str, simulator: ReplicateSimulator) -> None:
    user, thread = await new_user_thread(db_url)
    async with running_worker(worker_settings(simulator.base_url), db_url):
        first = await say(db_url, user, thread, "Hi there")
        await finished_runs(db_url, 1)
        message = await say(db_url, user, thread, "What goes with navy?")
        await finished_runs(db_url, 2)

    [create1, create2] = simulator.creates
    assert create2.path == "/v1/models/meta/meta-llama-3-8b-instruct/predictions"
    assert create2.headers["Authorization"] == "Bearer r8_test" and create2.headers["Prefer"] == "wait=60"
    sent = create2.body["input"]
    assert sent["prompt"] == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful, concise assistant.\n\n"
        "After your answer, write a line <<follow-ups>> and then up to three short questions the user might ask next,"
        " one per line.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nYou said: Hi there<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat goes with navy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert {k: sent[k] for k in ("prompt_template", "max_tokens", "temperature")} == \
        {"prompt_template": "{prompt}", "max_tokens": 512, "temperature": 0.6}

    [reply] = await query(db_url, "select * from assistant_messages where reply_to = %s", (message,))
    prediction = simulator.predictions[reply["metadata_json"]["prediction_id"]].to_json(1e12)
    metrics = prediction["metrics"]
    assert reply["role"] == "assistant" and reply["content"] == "You said: What goes with navy?"
    assert reply["user_id"] == user and reply["thread_id"] == thread
    assert reply["model"] == "meta/meta-llama-3-8b-instruct"
    # The follow-up questions the default assistant asks for are part of the output, not the reply.
    assert reply["token_count"] == metrics["output_token_count"] == 18
    assert reply["latency_ms"] >= 50
    [event] = await query(db_url, "select * from assistant_inference_events where message_id = %s", (message,))
    assert (event["status"], event["provider"], event["model"], event["attempt"]) == \
        ("succeeded", "replicate", "meta/meta-llama-3-8b-instruct", 1)
    assert event["prediction_id"] == prediction["id"]
    expected_cost = (Decimal("0.05") * metrics["input_token_count"] + Decimal("0.25") * 18) / 1_000_000
    assert event["cost_estimate_usd"] == expected_cost.quantize(Decimal("0.000001"))
    assert (event["input_tokens"], event["output_tokens"]) == (metrics["input_token_count"], 18)
    follow_ups = await query(db_url, "select position, suggestion from assistant_follow_ups where message_id = %s"
                                     " order by position", (reply["id"],))
    assert follow_ups == [{"position": 1, "suggestion": "Can you give an example?"},
                          {"position": 2, "suggestion": "What should I avoid?"}]
    assert event["latency_ms"] == reply["latency_ms"]
    assert first != message


async def test_an_image_goes_to_the_vision_model(db_url: str, simulator: ReplicateSimulator, public_images) -> None:
    simulator.latency = 0.4
    user, thread = await new_user_thread(db_url)
    async with running_worker(worker_settings(simulator.base_url), db_url):
        message = await say(db_url, user, thread, "What colour is this scarf?", "https://images.example/scarf.jpg")
        await finished_runs(db_url, 1)
    [create] = simulator.creates
    assert create.path == "/v1/predictions"
    assert create.body == {"version": "80537f9eead1a5bfa72d5ac6ea6414379be41d4d4f6679fd776e9535d1eb58bb", "input": {
        "image": "https://images.example/scarf.jpg",
        "prompt": "You are a helpful, concise assistant.\n\nAfter your answer, write a line <<follow-ups>> and then up"
                  " to three short questions the user might ask next, one per line.\n\nWhat colour is this scarf?",
        "max_tokens": 512, "temperature": 0.6}}
    [reply] = await query(db_url, "select * from assistant_messages where reply_to = %s", (message,))
    assert reply["model"] == "yorickvp/llava-13b"
    assert reply["content"] == "You said with an image: What colour is this scarf?"
    assert reply["metadata_json"]["route"] == "vision" and reply["metadata_json"]["tokens_estimated"] is True
    [event] = await query(db_url, "select * from assistant_inference_events where message_id = %s", (message,))
    predict_time = Decimal(str(reply["metadata_json"]["predict_time"]))
    assert predict_time >= Decimal("0.4")
    assert event["cost_estimate_usd"] == (predict_time * Decimal("0.000725")).quantize(Decimal("0.000001"))


@pytest.mark.parametrize(("fault", "code", "text"), [
    (Fault("http", status=401), "unauthorized", "the assistant is not configured correctly"),
    (Fault("http", status=402), "billing_required", "model account needs attention"),
    (Fault("http", status=422), "invalid_input", "could not be sent to the model"),
])
async def test_final_errors_end_the_run_with_a_reply_that_says_so(db_url, simulator, fault, code, text) -> None:
    simulator.inject(fault)
    user, thread = await new_user_thread(db_url)
    async with running_worker(worker_settings(simulator.base_url), db_url):
        message = await say(db_url, user, thread, "hello")
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["attempts"], run["last_error_code"]) == ("failed", 1, code)
    [reply] = await query(db_url, "select content, metadata_json from assistant_messages where reply_to = %s", (message,))
    assert text in reply["content"] and reply["metadata_json"]["error_code"] == code
    events = await query(db_url, "select status, error_code from assistant_inference_events")
    assert events == [{"status": "failed", "error_code": code}]
    assert len(simulator.creates) == 1


@pytest.mark.parametrize(("faults", "attempts"), [
    ([Fault("failed"), Fault("canceled")], 3),
    ([Fault("malformed"), Fault("garbage")], 3),
    # three HTTP tries per attempt (max_http_retries=2): the first attempt uses up its three
    ([Fault("http", status=503), Fault("http", status=503), Fault("http", status=500), Fault("http", status=500),
      Fault("http", status=502)], 2),
], ids=["failed-canceled", "malformed-garbage", "5xx"])
async def test_transient_errors_are_retried_as_new_attempts(db_url, simulator, faults, attempts) -> None:
    simulator.inject(*faults)
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, replicate_max_http_retries=2)
    async with running_worker(settings, db_url):
        message = await say(db_url, user, thread, "hello")
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["attempts"]) == ("completed", attempts)
    [reply] = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert reply["content"] == "You said: hello"
    events = await query(db_url, "select attempt, status from assistant_inference_events order by attempt")
    assert [e["status"] for e in events] == ["failed"] * (attempts - 1) + ["succeeded"]


async def test_retries_stop_at_the_attempt_limit(db_url, simulator) -> None:
    simulator.inject(*[Fault("failed")] * 3)
    user, thread = await new_user_thread(db_url)
    async with running_worker(worker_settings(simulator.base_url), db_url) as worker:
        message = await say(db_url, user, thread, "hello")
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["attempts"], run["last_error_code"]) == ("failed", 3, "model_failed")
    sample = worker.metrics.registry.get_sample_value
    assert sample("assistant_run_attempts_failed_total", {"error_code": "model_failed"}) == 3
    assert sample("assistant_runs_failed_total", {"error_code": "model_failed"}) == 1  # the run, once
    events = await query(db_url, "select attempt, status, error_code from assistant_inference_events order by attempt")
    assert [(e["attempt"], e["status"]) for e in events] == [(1, "failed"), (2, "failed"), (3, "failed")]
    replies = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert len(replies) == 1 and replies[0]["content"].startswith("Sorry, I could not produce a reply")


async def test_a_run_ended_meanwhile_is_not_counted_failed_by_the_late_attempt(db_url, simulator) -> None:
    """The run ends without the worker (here as the claim ends a run whose lease ran out on its
    last attempt) while its prediction runs; the prediction then fails. The worker records its
    attempt, but the run's failure is not its to count."""
    simulator.latency = 600.0  # ended by hand once the run has ended
    simulator.inject(Fault("failed"))
    user, thread = await new_user_thread(db_url)
    # Prefer: wait for 1 s, then polls: a prediction ended by hand is seen at the next poll.
    async with running_worker(worker_settings(simulator.base_url, replicate_prefer_wait_seconds=1), db_url) as worker:
        await say(db_url, user, thread, "hello")
        await wait_until(checking(lambda: simulator.predictions), what="a prediction")
        [run] = await query(db_url, "select id from assistant_runs")
        await query(db_url, "select assistant_finish_failed(%s, 'lease_expired', 'the worker of the last attempt died')",
                    (run["id"],))
        [prediction] = simulator.predictions.values()
        prediction.end_now()  # failed
        await wait_until(lambda: query(db_url, "select 1 from assistant_inference_events where status = 'failed'"),
                         what="the late attempt's event")
        sample = worker.metrics.registry.get_sample_value
        assert sample("assistant_run_attempts_failed_total", {"error_code": "model_failed"}) == 1
        assert sample("assistant_runs_failed_total", {"error_code": "model_failed"}) is None
    [row] = await query(db_url, "select status, last_error_code from assistant_runs")
    assert (row["status"], row["last_error_code"]) == ("failed", "lease_expired")
    assert worker.counts["superseded"] == 1


async def test_throttling_within_the_cap_is_absorbed(db_url, simulator) -> None:
    simulator.inject(Fault("http", status=429, retry_after=0.2, detail="Request was throttled. Your rate limit resets in ~1s."))
    user, thread = await new_user_thread(db_url)
    async with running_worker(worker_settings(simulator.base_url), db_url):
        await say(db_url, user, thread, "hello")
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["attempts"]) == ("completed", 1)
    assert len(simulator.creates) == 2


async def test_long_throttling_reschedules_the_run_for_when_it_resets(db_url, simulator) -> None:
    simulator.inject(Fault("http", status=429, detail="Request was throttled. Your rate limit resets in ~1s."))
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, replicate_max_retry_after_seconds=0.5)
    async with running_worker(settings, db_url):
        await say(db_url, user, thread, "hello")
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["attempts"]) == ("completed", 2)
    events = await query(db_url, "select status, error_code from assistant_inference_events order by attempt")
    assert events == [{"status": "failed", "error_code": "rate_limited"}, {"status": "succeeded", "error_code": None}]


async def test_a_missed_wakeup_is_answered_by_the_sweep(db_url, simulator) -> None:
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.3)
    async with running_worker(settings, db_url, wakeups=NoWakeups()):
        await say(db_url, user, thread, "anyone?")
        [run] = await finished_runs(db_url, 1)
    assert run["status"] == "completed"


async def test_work_waiting_before_start_is_found(db_url, simulator) -> None:
    user, thread = await new_user_thread(db_url)
    for i in range(5):
        await say(db_url, user, thread, f"queued {i}")
    async with running_worker(worker_settings(simulator.base_url), db_url, wakeups=NoWakeups()):
        runs = await finished_runs(db_url, 5)
    assert {r["status"] for r in runs} == {"completed"}


async def test_two_workers_on_one_backlog_answer_each_message_once(db_url, simulator) -> None:
    users = [await new_user_thread(db_url) for _ in range(4)]
    for i in range(15):
        for user, thread in users:
            await say(db_url, user, thread, f"message {i}")
    a = worker_settings(simulator.base_url, worker_id="worker-a", worker_concurrency=4, worker_claim_batch=2)
    b = worker_settings(simulator.base_url, worker_id="worker-b", worker_concurrency=4, worker_claim_batch=2)
    async with running_worker(a, db_url) as first, running_worker(b, db_url) as second:
        runs = await finished_runs(db_url, 60, timeout=60)
    assert {r["status"] for r in runs} == {"completed"} and len(runs) == 60
    replies = await query(db_url, "select reply_to, count(*) from assistant_messages where role = 'assistant' group by reply_to")
    assert len(replies) == 60 and {r["count"] for r in replies} == {1}
    assert len(simulator.creates) == 60
    assert first.counts["completed"] + second.counts["completed"] == 60


@pytest.mark.parametrize("stream", [False, True], ids=["waited", "streamed"])
async def test_a_reply_leaves_nothing_for_the_cyclic_garbage_collector(db_url, simulator, stream) -> None:
    """What a reply allocates is freed by reference counting as soon as it is done with. Objects in
    reference cycles wait for the cyclic collector instead, and at hundreds of replies per second
    the worker's memory grew for a minute before the collector caught up (tenacity's retry state:
    about 30 such objects per request, 330 for these five replies)."""
    users = [await new_user_thread(db_url) for _ in range(5)]
    settings = worker_settings(simulator.base_url, stream_replies=stream)
    async with running_worker(settings, db_url, stream=stream):
        for user, thread in users:  # first: connections are opened, caches filled
            await say(db_url, user, thread, "warm up")
        await finished_runs(db_url, 5)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, to be looked at
        try:
            for user, thread in users:
                await say(db_url, user, thread, "and again")
            await finished_runs(db_url, 10)
            gc.collect()
            cyclic = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert {r["status"] for r in await query(db_url, "select status from assistant_runs")} == {"completed"}
    assert not cyclic, cyclic.most_common(10)


async def test_shutdown_past_the_grace_period_releases_the_run_and_cancels_the_prediction(db_url, simulator) -> None:
    simulator.latency = 30
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, worker_shutdown_grace_seconds=0.2, replicate_prefer_wait_seconds=1)
    async with running_worker(settings, db_url) as worker:
        await say(db_url, user, thread, "slow one")
        # The worker knows the prediction's id once the create returned and it polls.
        polls = checking(lambda: [r for r in simulator.requests if r.method == "GET"])
        await wait_until(polls, what="a poll of the prediction")
    assert worker.counts["released"] == 1
    [run] = await query(db_url, "select status, attempts, lease_owner from assistant_runs")
    assert run == {"status": "queued", "attempts": 0, "lease_owner": None}
    [prediction] = simulator.predictions.values()
    assert prediction.canceled_at is not None


async def test_a_run_in_flight_does_not_hold_its_history(db_url, simulator) -> None:
    """The history is read for the prompt only: a run waiting seconds for its prediction, times
    the runs in flight, does not keep 50 messages as Python objects."""
    user, thread = await new_user_thread(db_url)
    settings = worker_settings(simulator.base_url, worker_shutdown_grace_seconds=0.2, replicate_prefer_wait_seconds=1)
    async with running_worker(settings, db_url) as worker:
        await say(db_url, user, thread, "an earlier question")
        await finished_runs(db_url, 1)
        simulator.latency = 30
        await say(db_url, user, thread, "a slow one")
        await wait_until(checking(lambda: len(simulator.creates) == 2), what="the second prediction")
        [task] = worker.inflight.values()
        run = task.get_coro().cr_frame.f_locals["run"]
        assert run.content == "a slow one" and run.history == []
    assert "an earlier question" in simulator.creates[-1].body["input"]["prompt"]


async def test_graceful_shutdown_finishes_work_in_flight(db_url, simulator) -> None:
    simulator.latency = 0.5
    user, thread = await new_user_thread(db_url)
    async with running_worker(worker_settings(simulator.base_url), db_url) as worker:
        await say(db_url, user, thread, "finish me")
        await wait_until(checking(lambda: worker.inflight), what="a run in flight")
    [run] = await query(db_url, "select status from assistant_runs")
    assert run["status"] == "completed"


def test_a_bad_setting_stops_start_up_with_one_line() -> None:
    env = {**os.environ, "WORKER_CONCURRENCY": "many", "REPLICATE_API_TOKEN": "x"}
    result = subprocess.run([sys.executable, "-m", "worker", "run"], cwd=PROJECT_DIR, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "invalid configuration: WORKER_CONCURRENCY: Input should be a valid integer, unable to parse string as an integer"]


async def test_terminal_chat_writes_through_rls_and_prints_replies(db_url, simulator, public_images) -> None:
    env = {**os.environ, "DATABASE_URL": db_url, "WORKER_TRANSPORT": "postgres"}
    async with running_worker(worker_settings(simulator.base_url), db_url):
        chat = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "chat", "--email", "terminal@example.com", cwd=PROJECT_DIR, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(chat.communicate(b"Hello from the terminal\n/image https://x.example/a.png What is it?\n"),
                                          timeout=60)
    lines = out.decode().splitlines()
    assert chat.returncode == 0, err.decode()
    assert lines[0].startswith("signed in as terminal@example.com")
    assert lines[1:] == ["assistant> You said: Hello from the terminal", "assistant> You said with an image: What is it?"]
    rows = await query(db_url, "select m.role, m.user_id = u.id as own from assistant_messages m, auth.users u"
                               " where u.email = 'terminal@example.com' order by m.created_at")
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"] and all(r["own"] for r in rows)


async def test_replies_finishing_together_are_written_in_one_call_each_exactly_once(db_url, simulator, monkeypatch) -> None:
    batches: list[int] = []
    original = PostgresStore.complete_many

    async def counted(self: PostgresStore, completions: list) -> dict:
        batches.append(len(completions))
        return await original(self, completions)

    monkeypatch.setattr(PostgresStore, "complete_many", counted)
    simulator.latency = 0.2  # the whole backlog is claimed at once and finishes at about the same time
    pairs = [await new_user_thread(db_url) for _ in range(12)]
    messages = [await say(db_url, user, thread, f"question {i}") for i, (user, thread) in enumerate(pairs)]
    async with running_worker(worker_settings(simulator.base_url), db_url) as worker:
        await finished_runs(db_url, len(messages))
    assert batches and max(batches) > 1 and worker.counts["completed"] == len(messages)
    replies = await query(db_url, "select reply_to from assistant_messages where role = 'assistant'")
    assert sorted(r["reply_to"] for r in replies) == sorted(messages)
    counted_tokens = await query(db_url, """
        select e.user_id, e.input_tokens + e.output_tokens as tokens, c.used
          from assistant_inference_events e
          join ai_usage_counters c on c.user_id = e.user_id and c.metric = 'tokens' and c.time_window = 'day'""")
    assert len(counted_tokens) == len(messages) and all(r["tokens"] == r["used"] for r in counted_tokens)


async def test_a_batch_with_a_deleted_run_is_completed_one_by_one(db_url, simulator, monkeypatch) -> None:
    original = PostgresStore.complete_many
    deleted: list[uuid.UUID] = []

    async def delete_one_first(self: PostgresStore, completions: list) -> dict:
        if not deleted:  # the user deletes one message while the batch is on its way
            deleted.append(completions[0].run.message_id)
            await query(db_url, "delete from assistant_messages where id = %s returning id", (deleted[0],))
        return await original(self, completions)

    monkeypatch.setattr(PostgresStore, "complete_many", delete_one_first)
    simulator.latency = 0.2
    pairs = [await new_user_thread(db_url) for _ in range(6)]
    messages = [await say(db_url, user, thread, f"question {i}") for i, (user, thread) in enumerate(pairs)]
    async with running_worker(worker_settings(simulator.base_url), db_url) as worker:
        await wait_until(checking(lambda: worker.counts["completed"] + worker.counts["gone"] == len(messages)))
    assert deleted and worker.counts["gone"] == 1 and worker.counts["completed"] == len(messages) - 1
    replies = await query(db_url, "select reply_to from assistant_messages where role = 'assistant'")
    assert sorted(r["reply_to"] for r in replies) == sorted(m for m in messages if m not in deleted)
