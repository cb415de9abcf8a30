"""Crashes and faults, each bounded in time: workers killed with SIGKILL mid-backlog, the runs of a
dead worker taken over once their lease expires, every kind of Replicate failure within the retry
budget, a database restart under a running worker (idle, or with a run in flight). Plus the metrics
and health endpoints that show it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import PROJECT_DIR
from tests.pipeline_helpers import (
    as_user,
    checking,
    finished_runs,
    new_user_thread,
    query,
    running_worker,
    say,
    wait_until,
    worker_settings,
)
from worker import migrations
from worker.localdb import LocalDatabase
from worker.app import health_endpoint
from worker.simulator import Fault, RecordedRequest, ReplicateSimulator
from worker.store import PostgresStore, StoreUnavailable


async def spawn_worker(db_url: str, simulator: ReplicateSimulator, name: str, *, concurrency: int = 8,
                       lease_seconds: int = 10, env_extra: dict[str, str] | None = None,
                       stderr: Any = asyncio.subprocess.DEVNULL) -> asyncio.subprocess.Process:
    # PGAPPNAME (read by libpq) names the worker's database sessions, so a test can tell when those
    # of a killed worker are gone: from then on, nothing the worker sent can still change the database.
    env = {**os.environ, "DATABASE_URL": db_url, "WORKER_TRANSPORT": "postgres", "REPLICATE_API_TOKEN": "r8_test",
           "REPLICATE_BASE_URL": simulator.base_url, "WORKER_ID": name, "PGAPPNAME": name,
           "WORKER_LEASE_SECONDS": str(lease_seconds), "WORKER_CONCURRENCY": str(concurrency),
           "WORKER_SWEEP_INTERVAL_SECONDS": "1", "REPLICATE_MAX_CREATES_PER_MINUTE": "0",
           "METRICS_ENABLED": "false", "LOG_LEVEL": "WARNING", "USAGE_REPORT_REFRESH_SECONDS": "0", **(env_extra or {})}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "worker", "run", cwd=PROJECT_DIR, env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=stderr)


async def held_by(db_url: str, worker_id: str) -> dict[uuid.UUID, int]:
    """The runs `worker_id` holds in progress, with the attempt each is on."""
    rows = await query(db_url, "select id, attempts from assistant_runs where status = 'in_progress' and lease_owner = %s",
                       (worker_id,))
    return {r["id"]: r["attempts"] for r in rows}


async def kill_while_holding_runs(db_url: str, process: asyncio.subprocess.Process, worker_id: str) -> dict[uuid.UUID, int]:
    """Waits until the worker holds runs of its own, SIGKILLs it, waits until its database sessions
    are gone (a statement in flight may still commit after the kill), and returns the runs it left
    in progress (its orphans) with the attempt each was on."""
    await wait_until(lambda: held_by(db_url, worker_id), timeout=30, what=f"{worker_id} to hold in-progress runs")
    process.send_signal(signal.SIGKILL)
    await process.wait()

    async def sessions_gone() -> bool:
        return not await query(db_url, "select 1 from pg_stat_activity where application_name = %s", (worker_id,))

    await wait_until(sessions_gone, what=f"the database sessions of {worker_id} to end")
    return await held_by(db_url, worker_id)


async def stop_processes(*processes: asyncio.subprocess.Process) -> None:
    for process in processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def new_thread(db_url: str, user: uuid.UUID) -> uuid.UUID:
    [row] = await as_user(db_url, user, "insert into assistant_threads (title) values ('t') returning id")
    return row["id"]


def asked(model_input: dict[str, Any], contents: dict[str, uuid.UUID]) -> uuid.UUID:
    """The message a prediction was for (each message is alone in its thread, so its content is
    the only one of `contents` its prompt carries)."""
    [message] = [m for content, m in contents.items() if content in str(model_input.get("prompt", ""))]
    return message


def created_for(request: RecordedRequest, contents: dict[str, uuid.UUID]) -> uuid.UUID:
    return asked((request.body or {}).get("input", {}), contents)


async def replies_by_message(db_url: str) -> dict[uuid.UUID, list[dict]]:
    """Every user message with the replies it got (an unanswered message maps to [])."""
    rows = await query(db_url, "select u.id as message_id, a.id as reply_id, a.metadata_json from assistant_messages u"
                               " left join assistant_messages a on a.reply_to = u.id and a.role = 'assistant'"
                               " where u.role = 'user'")
    found: dict[uuid.UUID, list[dict]] = {}
    for row in rows:
        found.setdefault(row["message_id"], [])
        if row["reply_id"] is not None:
            found[row["message_id"]].append(row)
    return found


async def assert_usage_counted_once(db_url: str, user: uuid.UUID, messages: int) -> None:
    """Each message admitted (counted) once, at its first claim; tokens and cost counted once per
    completed reply: the day's counters equal what the succeeded inference events add up to."""
    [window] = await query(db_url, "select coalesce(sum(messages), 0) as messages, coalesce(sum(requests), 0) as requests,"
                                   " coalesce(sum(tokens), 0) as tokens, coalesce(sum(cost_usd), 0) as cost"
                                   " from ai_usage_windows where user_id = %s and time_window = 'day'", (user,))
    [events] = await query(db_url, "select coalesce(sum(input_tokens + output_tokens), 0) as tokens,"
                                   " coalesce(sum(cost_estimate_usd), 0) as cost, count(*) as n"
                                   " from assistant_inference_events where user_id = %s and status = 'succeeded'", (user,))
    assert (window["messages"], window["requests"]) == (messages, messages)
    assert events["n"] > 0 and window["tokens"] == events["tokens"] > 0 and window["cost"] == events["cost"] > 0


async def test_workers_killed_with_sigkill_lose_nothing_and_double_nothing(db_url, simulator) -> None:
    # Two workers work off a backlog; the second is SIGKILLed three times, each time while it holds
    # runs of its own (not the orphans a predecessor left), and restarted under a new id.
    simulator.latency = 1.5  # each victim is killed with predictions on their way
    users = [await new_user_thread(db_url, plan="premium") for _ in range(4)]
    per_user = 15  # 60 messages; premium allows 60 requests an hour and 100 messages a day per user
    # A backlog larger than the queue premium allows (its quotas stay as they are).
    await query(db_url, "update ai_plans set max_queued_requests = null where id = 'premium' returning id")
    messages = []
    for i in range(per_user):
        for user, thread in users:
            messages.append(await say(db_url, user, thread, f"backlog {i}"))
    steady = await spawn_worker(db_url, simulator, "steady", concurrency=4)
    victim = await spawn_worker(db_url, simulator, "victim-0", concurrency=4)
    orphans: list[dict[uuid.UUID, int]] = []  # per kill: the runs the victim left in progress, and their attempt
    try:
        for round_ in range(3):
            orphans.append(await kill_while_holding_runs(db_url, victim, f"victim-{round_}"))
            victim = await spawn_worker(db_url, simulator, f"victim-{round_ + 1}", concurrency=4)
        runs = await finished_runs(db_url, len(messages), timeout=60)
    finally:
        await stop_processes(steady, victim)

    assert all(orphans), f"a victim held no run when it was killed: {orphans}"
    runs_by_id = {r["id"]: r for r in runs}
    assert len(runs_by_id) == len(messages) and {r["message_id"] for r in runs} == set(messages)
    assert await query(db_url, "select id from assistant_runs where status in ('queued', 'in_progress')") == []
    # A run fails only when it was killed on every attempt it had (lease_expired, from the claim);
    # every other run completed.
    killed_on_last_attempt = {run for kill in orphans for run, attempt in kill.items()
                              if attempt == runs_by_id[run]["max_attempts"]}
    for run in runs:
        if run["id"] in killed_on_last_attempt:
            assert (run["status"], run["last_error_code"]) == ("failed", "lease_expired")
        else:
            assert run["status"] == "completed", run
    # Every orphan was taken over by a later claim (its attempt counter moved on, and the reply came
    # from a later attempt), unless it was on its last attempt.
    succeeded = {r["run_id"]: r for r in await query(
        db_url, "select run_id, count(*) as n, max(attempt) as attempt from assistant_inference_events"
                " where status = 'succeeded' group by run_id")}
    taken_over = 0
    for kill in orphans:
        for run, attempt in kill.items():
            if attempt == runs_by_id[run]["max_attempts"]:
                continue  # no attempt left to take over with: the claim failed it (checked above)
            assert runs_by_id[run]["attempts"] > attempt
            if run not in killed_on_last_attempt:
                assert succeeded[run]["attempt"] > attempt
            taken_over += 1
    assert taken_over > 0
    # No claim other than after a kill: attempts add up to one per message plus one per orphan taken
    # over; and no attempt created more than one prediction.
    assert sum(r["attempts"] for r in runs) == len(messages) - len(killed_on_last_attempt) + \
        sum(len(kill) for kill in orphans)
    assert len(simulator.creates) <= sum(r["attempts"] for r in runs)
    # Exactly one reply per user message, and one succeeded inference event per completed run.
    replies = await replies_by_message(db_url)
    assert set(replies) == set(messages) and all(len(r) == 1 for r in replies.values())
    [count] = await query(db_url, "select count(*) as n from assistant_messages where role = 'assistant'")
    assert count["n"] == len(messages)
    completed = {r["id"] for r in runs if r["status"] == "completed"}
    assert set(succeeded) == completed and {r["n"] for r in succeeded.values()} == {1}
    for user, _ in users:
        await assert_usage_counted_once(db_url, user, per_user)


async def test_runs_left_by_a_dead_worker_are_taken_over_once_their_lease_expires(db_url, simulator) -> None:
    # A worker holding runs dies (SIGKILL, mid-prediction). Its runs stay in progress until their
    # lease expires; then a second worker, woken by nothing but its sweep, takes each over and
    # brings it to an end: a reply for the runs with attempts left, lease_expired for the one that
    # was on its last attempt. No prediction is started for a run while the dead worker's lease on
    # it still holds, and none stays claimed afterwards.
    simulator.latency = 60  # the doomed worker's predictions are still running when it dies
    user, _ = await new_user_thread(db_url, plan="premium")
    contents = {f"orphan-{i}": await say(db_url, user, await new_thread(db_url, user), f"orphan-{i}") for i in range(5)}
    last_attempt = contents["orphan-4"]
    await query(db_url, "update assistant_runs set max_attempts = 1 where message_id = %s returning id", (last_attempt,))
    doomed = await spawn_worker(db_url, simulator, "doomed", lease_seconds=10)
    try:
        await wait_until(lambda: held_by(db_url, "doomed"), timeout=30, what="the doomed worker to claim")
        await wait_until(checking(lambda: len(simulator.creates) == 5), what="5 predictions to start")
        orphans = await kill_while_holding_runs(db_url, doomed, "doomed")
    finally:
        await stop_processes(doomed)
    assert len(orphans) == 5 and set(orphans.values()) == {1}
    expiry = {r["id"]: r["expires"] for r in await query(
        db_url, "select id, extract(epoch from lease_expires_at)::float8 as expires from assistant_runs")}
    simulator.latency = 0.2
    doomed_creates = len(simulator.creates)

    settings = worker_settings(simulator.base_url, worker_id="rescuer", worker_lease_seconds=10,
                               worker_sweep_interval_seconds=0.5)
    async with running_worker(settings, db_url) as rescuer:
        runs = await finished_runs(db_url, 5, timeout=30)
    assert await query(db_url, "select id from assistant_runs where status in ('queued', 'in_progress')") == []
    by_message = {r["message_id"]: r for r in runs}
    for content, message in contents.items():
        run = by_message[message]
        assert run["lease_owner"] is None
        # Ended only once the dead worker's lease had run out (how soon after is the sweep's
        # business, and a benchmark's, not a bound to assert here).
        [finished] = await query(db_url, "select extract(epoch from finished_at)::float8 as t from assistant_runs"
                                         " where id = %s", (run["id"],))
        assert expiry[run["id"]] <= finished["t"]
        if message == last_attempt:
            assert (run["status"], run["attempts"], run["last_error_code"]) == ("failed", 1, "lease_expired")
        else:
            assert (run["status"], run["attempts"]) == ("completed", 2), content
    # The rescuer made one prediction per run it took over, each only after the dead worker's lease
    # on that run had expired; the run on its last attempt got none.
    assert len(simulator.creates) == len(simulator.predictions) == doomed_creates + 4
    rescued = list(simulator.predictions.values())[doomed_creates:]
    assert sorted(asked(p.input, contents) for p in rescued) == sorted(m for m in contents.values() if m != last_attempt)
    for prediction in rescued:
        assert prediction.created >= expiry[by_message[asked(prediction.input, contents)]["id"]]
    assert rescuer.counts["claimed"] == 4
    replies = await replies_by_message(db_url)
    assert set(replies) == set(contents.values()) and all(len(r) == 1 for r in replies.values())
    assert replies[last_attempt][0]["metadata_json"]["error_code"] == "lease_expired"
    events = await query(db_url, "select run_id, attempt, status from assistant_inference_events")
    assert sorted((e["attempt"], e["status"]) for e in events) == [(2, "succeeded")] * 4
    await assert_usage_counted_once(db_url, user, 5)


@pytest.mark.parametrize("case", ["within-the-grace-period", "past-it-streamed", "past-it-held"])
async def test_sigterm_lets_runs_in_flight_finish_or_gives_them_back(db_url, simulator, tmp_path, case) -> None:
    """`python -m worker run` as deployed (uvloop's event loop, signal handlers) on SIGTERM stops
    claiming and lets the runs in flight finish within WORKER_SHUTDOWN_GRACE_SECONDS; past it,
    it cancels their predictions at Replicate and gives the runs back without counting the
    attempt. It exits 0 either way. Streamed, the worker holds each prediction's id when the
    signal comes; a create held by Prefer: wait has not answered yet: the worker gives the run
    back at once, waits for the create to answer, then cancels its prediction."""
    grace = case == "within-the-grace-period"
    streamed = case == "past-it-streamed"
    # Still running when the signal comes: ended by hand once it is handled, or cancelled. (20 s
    # streamed: the simulator's stream of a cancelled prediction ends at its next token.)
    simulator.latency = 20.0 if streamed else 600.0
    user, _ = await new_user_thread(db_url, plan="premium")
    messages = [await say(db_url, user, await new_thread(db_url, user), f"in flight {i}") for i in range(3)]
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log_file:
        worker = await spawn_worker(db_url, simulator, "terminated", stderr=log_file,
                                    env_extra={"WORKER_SHUTDOWN_GRACE_SECONDS": "30" if grace else "0",
                                               "LOG_LEVEL": "INFO", "STREAM_REPLIES": str(streamed).lower(),
                                               # within the grace period polled: a prediction ended by
                                               # hand is seen at the next read
                                               "REPLICATE_PREFER_WAIT_SECONDS": "1" if grace else "60"})
    try:
        if streamed:
            await wait_until(checking(lambda: sum(r.path.startswith("/v1/streams/") for r in simulator.requests) == 3),
                             timeout=30, what="3 predictions to stream")
        else:
            await wait_until(checking(lambda: len(simulator.creates) == 3), timeout=30, what="3 predictions to start")
        worker.send_signal(signal.SIGTERM)
        if grace:
            await wait_until(checking(lambda: '"worker.draining"' in log_path.read_text()), timeout=30,
                             what="the worker to start draining")
            assert await held_by(db_url, "terminated")  # still its own while they finish
            for prediction in simulator.predictions.values():
                prediction.end_now()
        elif not streamed:
            await wait_until(checking(lambda: '"worker.settling"' in log_path.read_text()), timeout=30,
                             what="the worker to wait for the held creates")
            assert not any(p.canceled_at for p in simulator.predictions.values())
            for prediction in simulator.predictions.values():
                prediction.answer_now.set()  # the held creates answer, the predictions still running
        assert await asyncio.wait_for(worker.wait(), timeout=30) == 0
    finally:
        await stop_processes(worker)
    runs = await query(db_url, "select status, attempts, lease_owner from assistant_runs")
    replies = await replies_by_message(db_url)
    assert len(simulator.predictions) == 3
    if grace:
        assert [(r["status"], r["attempts"]) for r in runs] == [("completed", 1)] * 3
        assert set(replies) == set(messages) and all(len(r) == 1 for r in replies.values())
    else:
        assert [(r["status"], r["attempts"], r["lease_owner"]) for r in runs] == [("queued", 0, None)] * 3
        assert all(p.canceled_at is not None for p in simulator.predictions.values())
        assert not any(replies.values())
    assert '"worker.stopped"' in log_path.read_text()


FAULT_MIX = [
    Fault("http", status=429, retry_after=0.1), Fault("http", status=429), Fault("http", status=500),
    Fault("http", status=503), Fault("hang"), Fault("failed"), Fault("canceled"), Fault("malformed"),
    Fault("garbage"), Fault("http", status=502), Fault("hang"), Fault("failed"),
]


async def test_every_replicate_fault_ends_in_a_terminal_state_within_the_retry_budget(db_url, simulator) -> None:
    simulator.inject(*FAULT_MIX)
    user, _ = await new_user_thread(db_url)
    http_retries = 1
    # One run at a time, so that faults come in a row to the same attempt (429 with Retry-After, then
    # 429 without, 500 then 503 ...) and an attempt retrying more than its HTTP budget would show.
    settings = worker_settings(simulator.base_url, replicate_max_http_retries=http_retries, replicate_timeout_seconds=0.5,
                               replicate_prefer_wait_seconds=1, worker_lease_seconds=10, worker_concurrency=1,
                               replicate_max_retry_after_seconds=0.5, worker_retry_base_seconds=0.05)
    # Each message alone in its thread: a create request's prompt names the message it is for.
    contents = {f"fault-{i:02d}": await say(db_url, user, await new_thread(db_url, user), f"fault-{i:02d}")
                for i in range(12)}
    async with running_worker(settings, db_url):
        runs = await finished_runs(db_url, len(contents), timeout=60)
    assert simulator.faults == []  # every fault was served
    assert await query(db_url, "select id from assistant_runs where status in ('queued', 'in_progress')") == []
    events = await query(db_url, "select run_id, attempt, status, error_code from assistant_inference_events")
    creates = Counter(created_for(r, contents) for r in simulator.creates)
    for run in runs:
        mine = sorted((e for e in events if e["run_id"] == run["id"]), key=lambda e: e["attempt"])
        # Every attempt the run was claimed for is accounted for by exactly one event.
        assert [e["attempt"] for e in mine] == list(range(1, run["attempts"] + 1)), (run, mine)
        assert all(e["status"] == "failed" for e in mine[:-1])
        if run["status"] == "completed":
            assert mine[-1]["status"] == "succeeded"
        else:
            # Every fault here is retryable: a run may fail only once its attempts are spent.
            assert run["status"] == "failed" and run["attempts"] == run["max_attempts"], run
            assert mine[-1]["status"] == "failed" and run["last_error_code"] == mine[-1]["error_code"]
        # The retry budget at Replicate: at least one create per attempt, at most 1 + the HTTP
        # retries per attempt.
        assert run["attempts"] <= creates[run["message_id"]] <= run["attempts"] * (1 + http_retries), run
    # Each create either served a fault or made a prediction that answered a message: none wasted.
    assert len(simulator.creates) == len(FAULT_MIX) + sum(r["status"] == "completed" for r in runs)
    replies = await replies_by_message(db_url)
    assert set(replies) == set(contents.values()) and all(len(r) == 1 for r in replies.values())
    codes = {e["error_code"] for e in events if e["status"] == "failed"}
    assert codes <= {"rate_limited", "provider_unavailable", "timeout", "model_failed", "invalid_output"}
    assert codes >= {"timeout", "model_failed", "invalid_output"}  # these are never absorbed by HTTP retries


@pytest.mark.parametrize("fault", ["failed", "malformed", "deadline"])
async def test_what_a_failed_attempt_s_prediction_consumed_is_recorded_but_not_charged_to_the_user(
        db_url, simulator, fault: str) -> None:
    """A prediction that failed, answered with an unusable output, or was cancelled at the
    attempt's deadline ran at Replicate and is paid for: its tokens and cost are on the failed
    attempt's event and in the cost metric; the user's usage counts only the reply they got."""
    settings = worker_settings(simulator.base_url, replicate_prefer_wait_seconds=1, worker_retry_base_seconds=0.05)
    if fault == "deadline":
        simulator.latency = 600  # the first prediction never ends: cancelled at the deadline
        settings = worker_settings(simulator.base_url, replicate_prefer_wait_seconds=1, worker_retry_base_seconds=0.05,
                                   prediction_timeout_seconds=1.5)
    else:
        simulator.inject(Fault(fault))
    user, thread = await new_user_thread(db_url, plan="premium")
    async with running_worker(settings, db_url) as worker:
        await say(db_url, user, thread, "try twice")
        if fault == "deadline":
            await wait_until(lambda: query(db_url, "select 1 from assistant_inference_events where status = 'failed'"),
                             timeout=10, what="the deadline")
            simulator.latency = 0.05
        [run] = await finished_runs(db_url, 1, timeout=30)
    assert (run["status"], run["attempts"]) == ("completed", 2)
    first, second = await query(db_url, "select status, error_code, prediction_id, input_tokens, output_tokens,"
                                        " cost_estimate_usd from assistant_inference_events order by attempt")
    code = {"failed": "model_failed", "malformed": "invalid_output", "deadline": "timeout"}[fault]
    assert (first["status"], first["error_code"], second["status"]) == ("failed", code, "succeeded")
    assert first["prediction_id"] in simulator.predictions
    assert first["input_tokens"] > 0 and first["cost_estimate_usd"] > 0
    if fault == "malformed":  # it succeeded at Replicate: its own counts
        assert first["output_tokens"] == len(simulator.predictions[first["prediction_id"]].tokens)
    assert worker.metrics.registry.get_sample_value("assistant_cost_usd_total", {"model": "meta/meta-llama-3-8b-instruct"}) \
        == pytest.approx(float(first["cost_estimate_usd"] + second["cost_estimate_usd"]))
    await assert_usage_counted_once(db_url, user, 1)  # the reply's tokens and cost only


@pytest.mark.parametrize("odd", [float("nan"), float("inf"), -50, 3_000_000_000])
async def test_odd_numbers_in_a_prediction_s_metrics_are_estimated_instead(db_url, simulator, monkeypatch, odd) -> None:
    """Counts no database can hold (JSON's NaN, Infinity, a negative or huge number) count as
    absent: the reply is written with estimated tokens, not left claimed until its lease ends."""
    from worker.simulator import SimPrediction

    as_replicate = SimPrediction.to_json

    def odd_metrics(self: SimPrediction, now: float) -> dict[str, Any]:
        body = as_replicate(self, now)
        if body["status"] == "succeeded":
            body["metrics"].update(input_token_count=odd, output_token_count=odd, time_to_first_token=odd)
        return body

    monkeypatch.setattr(SimPrediction, "to_json", odd_metrics)
    user, thread = await new_user_thread(db_url)
    async with running_worker(worker_settings(simulator.base_url), db_url):
        message = await say(db_url, user, thread, "count me")
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["attempts"]) == ("completed", 1)
    [reply] = await query(db_url, "select metadata_json from assistant_messages where reply_to = %s", (message,))
    assert reply["metadata_json"]["tokens_estimated"] is True
    [event] = await query(db_url, "select input_tokens, output_tokens from assistant_inference_events")
    assert 0 < event["input_tokens"] < 10_000 and 0 < event["output_tokens"] < 10_000


@pytest.fixture
async def own_cluster(tmp_path: Path) -> AsyncIterator[tuple[LocalDatabase, str]]:
    """A database server of its own, to be restarted under a worker."""
    cluster = LocalDatabase(tmp_path / "restartable", fast=True)
    await asyncio.to_thread(cluster.start)
    url = cluster.url()
    await asyncio.to_thread(migrations.prepare, url, project_dir=PROJECT_DIR, seed=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into ai_plans (id, name) values ('unlimited', 'Unlimited (tests)')")
    yield cluster, url
    await asyncio.to_thread(cluster.destroy)


READ_FAULTS = [Fault("http", status=500, on="get"), Fault("http", status=429, retry_after=0.1, on="get"),
               Fault("garbage", on="get"), Fault("http", status=503, on="get"), Fault("hang", on="get")]


@pytest.mark.parametrize("stream", [False, True], ids=["polled", "streamed"])
@pytest.mark.parametrize("http_retries", [0, 3])
async def test_faults_on_reads_of_a_running_prediction_cost_no_second_prediction(db_url, simulator, stream,
                                                                               http_retries) -> None:
    # Replicate failing on reads of a prediction that is running fine (the polls, or the final read
    # after a stream), whether within the HTTP retry budget of one read or past it: the worker reads
    # the same prediction again until its deadline. The attempt does not fail, no second prediction
    # is paid for, one reply, no run left claimed, usage counted once.
    # Streamed, the create does not wait and the stream lasts 1.2 s: the faults meet the final read
    # and the polls after it. Polled, the prediction runs until every fault has met a read (Prefer:
    # wait returns it still running), and is then ended by hand.
    simulator.latency = 1.2 if stream else 600
    simulator.inject(*READ_FAULTS)
    user, thread = await new_user_thread(db_url, plan="premium")
    settings = worker_settings(simulator.base_url, replicate_max_http_retries=http_retries, replicate_timeout_seconds=0.5,
                               replicate_prefer_wait_seconds=1, replicate_max_retry_after_seconds=0.5,
                               worker_retry_base_seconds=0.05, worker_lease_seconds=30)
    async with running_worker(settings, db_url, stream=stream):
        message = await say(db_url, user, thread, "read me carefully")
        if not stream:
            await wait_until(checking(lambda: simulator.faults == []), 30, "every read fault to be met")
            [prediction] = simulator.predictions.values()
            prediction.end_now()
        [run] = await finished_runs(db_url, 1, timeout=30)
    assert simulator.faults == []  # every read fault was met
    assert (run["status"], run["attempts"]) == ("completed", 1)
    assert len(simulator.creates) == 1 and len(simulator.predictions) == 1
    reads = [r for r in simulator.requests if r.method == "GET" and r.path.startswith("/v1/predictions/")]
    assert len(reads) > len(READ_FAULTS)  # each fault met a read, and the prediction was read once more
    assert await query(db_url, "select id from assistant_runs where status in ('queued', 'in_progress')") == []
    events = await query(db_url, "select attempt, status from assistant_inference_events")
    assert events == [{"attempt": 1, "status": "succeeded"}]
    replies = await replies_by_message(db_url)
    assert list(replies) == [message] and len(replies[message]) == 1
    await assert_usage_counted_once(db_url, user, 1)


async def test_a_prediction_given_up_on_a_refused_read_is_cancelled(db_url, simulator) -> None:
    # A read refused for good (the token no longer valid: 401) fails the attempt; the prediction it
    # leaves running is cancelled at Replicate, so that it is not paid for beside the next one.
    simulator.latency = 5
    simulator.inject(Fault("http", status=401, on="get"))
    user, thread = await new_user_thread(db_url, plan="premium")
    settings = worker_settings(simulator.base_url, replicate_prefer_wait_seconds=1, worker_retry_base_seconds=0.05)
    async with running_worker(settings, db_url):
        await say(db_url, user, thread, "a long one")
        [run] = await finished_runs(db_url, 1, timeout=30)
    assert (run["status"], run["last_error_code"]) == ("failed", "unauthorized")  # not retried: the token is refused
    [prediction] = simulator.predictions.values()
    assert prediction.canceled_at is not None
    assert [r.path for r in simulator.requests if r.method == "POST" and r.path.endswith("/cancel")] == \
        [f"/v1/predictions/{prediction.id}/cancel"]


async def test_a_prediction_replicate_no_longer_knows_is_made_again(db_url, simulator) -> None:
    # A read answered 404 (Replicate lost the prediction): the attempt fails as
    # prediction_not_found and the run makes a new prediction; before, the 404 read as
    # "model not found" and ended the run failed.
    simulator.latency = 1.5
    simulator.inject(Fault("http", status=404, on="get"))
    user, thread = await new_user_thread(db_url, plan="premium")
    settings = worker_settings(simulator.base_url, replicate_prefer_wait_seconds=1, replicate_max_http_retries=0,
                               worker_retry_base_seconds=0.05)
    async with running_worker(settings, db_url):
        message = await say(db_url, user, thread, "are you there?")
        [run] = await finished_runs(db_url, 1, timeout=30)
    assert (run["status"], run["attempts"]) == ("completed", 2)
    events = await query(db_url, "select attempt, status, error_code from assistant_inference_events order by attempt")
    assert events == [{"attempt": 1, "status": "failed", "error_code": "prediction_not_found"},
                      {"attempt": 2, "status": "succeeded", "error_code": None}]
    replies = await replies_by_message(db_url)
    assert list(replies) == [message] and len(replies[message]) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["polled", "streamed"])
async def test_a_create_whose_answer_is_lost_costs_no_second_prediction(db_url, simulator, stream) -> None:
    # Replicate creates the prediction and its answer never arrives (a timeout): the worker finds
    # that prediction in the account's list and answers with it. Before, the run's retry made a
    # second prediction and the first ran on, paid for and unknown.
    simulator.latency = 0.3
    simulator.inject(Fault("lost"))
    user, thread = await new_user_thread(db_url, plan="premium")
    settings = worker_settings(simulator.base_url, replicate_prefer_wait_seconds=1, replicate_timeout_seconds=0.5,
                               worker_retry_base_seconds=0.05)
    async with running_worker(settings, db_url, stream=stream) as worker:
        message = await say(db_url, user, thread, "did you get that?")
        [run] = await finished_runs(db_url, 1, timeout=30)
    assert worker.metrics.registry.get_sample_value("assistant_lost_creates_total", {"outcome": "found"}) == 1
    assert simulator.faults == []
    assert (run["status"], run["attempts"]) == ("completed", 1)
    assert len(simulator.creates) == 1 and len(simulator.predictions) == 1
    assert [r.path for r in simulator.requests if r.method == "GET" and r.path == "/v1/predictions"] == ["/v1/predictions"]
    [prediction] = simulator.predictions.values()
    events = await query(db_url, "select attempt, status, prediction_id"
                                 " from assistant_inference_events")
    assert events == [{"attempt": 1, "status": "succeeded", "prediction_id": prediction.id}]
    replies = await replies_by_message(db_url)
    assert list(replies) == [message] and len(replies[message]) == 1
    await assert_usage_counted_once(db_url, user, 1)


class WatchedStore(PostgresStore):
    """The worker's own store, noting each call that failed because the database was away."""

    failed: list[str]

    async def call(self, function: str, args: dict[str, Any], *, rows: bool = False) -> Any:
        try:
            return await super().call(function, args, rows=rows)
        except StoreUnavailable:
            self.failed.append(function)
            raise


@pytest.mark.parametrize("outage", ["while_idle", "while_a_prediction_runs", "while_the_reply_is_written"])
async def test_the_worker_recovers_from_a_database_restart_and_reports_it(own_cluster, simulator, outage) -> None:
    # The database goes down and comes back under a running worker: with nothing in flight, while a
    # prediction is running (the database is back before it ends), or once a prediction has ended
    # and its reply cannot be written (back after the worker's first write failed). The run in
    # flight still ends with one reply from its one prediction, counted once, and the same worker
    # (never restarted) answers a message sent after the restart.
    cluster, url = own_cluster
    user, thread = await new_user_thread(url, plan="premium")
    # Prefer: wait for 1 s, then polls: a prediction ended by hand is seen at the next poll.
    # A lease far longer than the outage: a run must not be taken over for taking long.
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.5, worker_lease_seconds=60,
                               replicate_prefer_wait_seconds=1, metrics_enabled=True, metrics_host="127.0.0.1",
                               metrics_port=0)
    store = await WatchedStore.connect(url)
    store.failed = []
    try:
        async with running_worker(settings, url, store=store) as worker, httpx.AsyncClient() as http, \
                health_endpoint(settings, worker) as health:
            assert health is not None
            base = f"http://127.0.0.1:{health.port}"
            await wait_until(lambda: ready(http, base), what="readiness")
            await say(url, user, thread, "before the restart")
            await finished_runs(url, 1)
            in_flight = None
            if outage != "while_idle":
                # A prediction that outlasts any restart; it is ended by hand: once the database is
                # back, or (the reply is written) once it is down.
                simulator.latency = 600.0
                in_flight = await say(url, user, thread, "during the restart")
                await wait_until(checking(lambda: len(simulator.creates) == 2), what="the prediction to start")
                [prediction] = [p for p in simulator.predictions.values() if "during the restart" in p.input["prompt"]]

            await asyncio.to_thread(cluster.stop)
            await wait_until(lambda: not_ready(http, base), what="readiness to drop")
            assert (await http.get(f"{base}/healthz")).status_code == 200  # alive, just not ready
            if outage == "while_the_reply_is_written":
                prediction.end_now()  # the database down
                await wait_until(checking(lambda: {"complete_run", "complete_runs"} & set(store.failed)),
                                 timeout=30, what="the reply's write to fail")
            await asyncio.to_thread(cluster.start)
            if outage == "while_a_prediction_runs":
                # The database came back before the prediction ended, and no write was tried.
                assert prediction.status(time.time()) in ("starting", "processing")
                assert not {"complete_run", "complete_runs"} & set(store.failed)
                prediction.end_now()

            await wait_until(lambda: ready(http, base), timeout=30, what="readiness after the restart")
            if in_flight is not None:
                simulator.latency = 0.05
            await say(url, user, thread, "after the restart")
            expected = 2 if in_flight is None else 3
            runs = await finished_runs(url, expected, timeout=30)
            metrics = (await http.get(f"{base}/metrics")).text
    finally:
        await store.close()
    assert len(runs) == expected
    assert {(r["status"], r["attempts"]) for r in runs} == {("completed", 1)}  # no run claimed twice
    assert len(simulator.creates) == expected  # one prediction per message: none made again
    replies = await replies_by_message(url)
    assert len(replies) == expected and all(len(r) == 1 for r in replies.values())
    succeeded = await query(url, "select message_id from assistant_inference_events where status = 'succeeded'")
    assert sorted(str(e["message_id"]) for e in succeeded) == sorted(str(m) for m in replies)
    await assert_usage_counted_once(url, user, expected)
    assert f'assistant_runs_completed_total{{model="meta/meta-llama-3-8b-instruct"}} {expected}.0' in metrics
    assert f"assistant_runs_claimed_total {expected}.0" in metrics
    assert "assistant_provider_latency_seconds_count" in metrics
    assert "assistant_wakeups_live 1.0" in metrics


async def ready(http: httpx.AsyncClient, base: str) -> bool:
    return (await http.get(f"{base}/readyz")).status_code == 200


async def not_ready(http: httpx.AsyncClient, base: str) -> bool:
    response = await http.get(f"{base}/readyz")
    return response.status_code == 503 and "database unavailable" in response.json()["reason"]


async def test_a_migration_changing_a_functions_result_type_under_a_running_worker_costs_no_call(db_url: str) -> None:
    # psycopg prepares a statement run five times; PostgreSQL then refuses the prepared call once the
    # function's result type changed ("cached plan must not change result type"), on that connection
    # until it closes. 20261123000100 changed claim_runs' so; the store prepares afresh and calls again.
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as admin:
        await admin.execute("create function public.probe() returns table (x jsonb) language sql as $$ select '[1]'::jsonb $$")
        await admin.execute("create function public.probe_unsupported() returns table (x int) language plpgsql as $$ begin "
                            "raise exception 'not supported here' using errcode = '0A000'; end $$")
        store = await PostgresStore.connect(db_url, max_size=1)
        try:
            for _ in range(6):
                assert await store.call("probe", {}, rows=True) == [{"x": [1]}]
            async with store.pool.connection() as c:
                prepared = await (await c.execute("select count(*) as n from pg_prepared_statements")).fetchone()
            assert prepared["n"] >= 1  # the call is prepared: the case this test is about
            await admin.execute("drop function public.probe(); "
                                "create function public.probe() returns table (x json) language sql as $$ select '[2]'::json $$")
            assert await store.call("probe", {}, rows=True) == [{"x": [2]}]
            assert await store.call("probe", {}, rows=True) == [{"x": [2]}]
            with pytest.raises(psycopg.errors.FeatureNotSupported):  # other refusals of the kind still fail
                await store.call("probe_unsupported", {}, rows=True)
        finally:
            await store.close()


async def test_a_database_call_past_the_statement_timeout_is_unavailable_not_stuck(db_url, monkeypatch) -> None:
    # A call stuck behind a lock (or on an overloaded server) ends at the statement timeout as
    # StoreUnavailable, which the worker retries within the lease, instead of holding its run's
    # slot and a connection for ever. The usage-report refresh, whose time grows with the data,
    # runs without it; the session keeps its timeout afterwards.
    import worker.store

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        for name in ("test_slow", "test_slow_report"):
            await conn.execute(f"create function public.{name}(p_seconds float) returns int language sql"
                               " as $$ select 1 from pg_sleep(p_seconds) $$")
    monkeypatch.setattr(worker.store, "UNTIMED_CALLS", frozenset({"test_slow_report"}))
    store = await PostgresStore.connect(db_url, max_size=1, statement_timeout=0.2)
    try:
        assert await store.call("test_slow", {"p_seconds": 0.01}) == 1
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            await store.call("test_slow", {"p_seconds": 2})
        assert await store.call("test_slow_report", {"p_seconds": 0.4}) == 1
        with pytest.raises(StoreUnavailable, match="statement timeout"):  # the same connection (max_size 1)
            await store.call("test_slow", {"p_seconds": 2})
    finally:
        await store.close()
