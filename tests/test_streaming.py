"""Streaming replies end to end with the simulator's server-sent events: NOTIFY on the postgres
transport, Realtime Broadcast on the supabase transport, an `error` event, a broken stream; and
who may join a thread's private broadcast topic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import postgrest
from tests.pipeline_helpers import checking, finished_runs, new_user_thread, query, running_worker, say, wait_until, worker_settings
from tests.postgrest import create_user, request
from tests.supabase_emulator import SupabaseEmulator
from tests.test_supabase_transport import start_worker, stop_worker, supabase_settings
from worker.prompts import MARKERS, visible_text
from worker.simulator import Fault, ReplicateSimulator
from worker.batching import Batcher
from worker.streaming import NOTIFY_CHANNEL, NotifyPublisher


def streaming_worker(simulator: ReplicateSimulator, db_url: str, **overrides: Any):
    return running_worker(worker_settings(simulator.base_url, **{"stream_publish_interval_ms": 0, **overrides}),
                          db_url, stream=True)


@contextlib.asynccontextmanager
async def listening(db_url: str) -> AsyncIterator[list[dict]]:
    """Collects the stream NOTIFY messages while the block runs."""
    received: list[dict] = []
    conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
    await conn.execute(f"listen {NOTIFY_CHANNEL}")

    async def collect() -> None:
        async for notify in conn.notifies():
            received.append(json.loads(notify.payload))

    task = asyncio.create_task(collect())
    try:
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await conn.close()


def joined(deltas: list[dict]) -> str:
    return "".join(d["delta"] for d in sorted(deltas, key=lambda d: d["seq"]))


async def test_a_reply_streams_to_the_thread_and_is_written_once(db_url, simulator) -> None:
    simulator.latency = 0.6
    user, thread = await new_user_thread(db_url)
    async with listening(db_url) as received, streaming_worker(simulator, db_url):
        message = await say(db_url, user, thread, "Tell me about wool coats in winter")
        [run] = await finished_runs(db_url, 1)
        await wait_until(checking(lambda: any(d["done"] for d in received)), what="the final delta")
    [create] = simulator.creates
    assert "Prefer" not in create.headers  # streamed: no waiting on create
    assert [r.path for r in simulator.requests if r.path.startswith("/v1/streams/")]
    [reply] = await query(db_url, "select id, content from assistant_messages where reply_to = %s", (message,))
    assert reply["content"] == "You said: Tell me about wool coats in winter"
    deltas = [d for d in received if d["message_id"] == str(message)]
    assert len(deltas) > 3 and all(d["thread_id"] == str(thread) and d["run_id"] == str(run["id"]) for d in deltas)
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert joined(deltas).strip() == reply["content"]  # the follow-up block is never shown while streaming
    assert "<<" not in joined(deltas)
    assert deltas[-1]["done"] and sum(d["done"] for d in deltas) == 1
    [event] = await query(db_url, "select time_to_first_token_ms, latency_ms from assistant_inference_events")
    assert 0 < event["time_to_first_token_ms"] < event["latency_ms"]
    assert await query(db_url, "select count(*) as n from assistant_messages where role = 'assistant'") == [{"n": 1}]


async def test_an_error_event_fails_the_attempt_and_the_retry_answers(db_url, simulator) -> None:
    simulator.latency = 0.3
    simulator.inject(Fault("stream_error"))
    user, thread = await new_user_thread(db_url)
    async with listening(db_url) as received, streaming_worker(simulator, db_url):
        message = await say(db_url, user, thread, "one two three four five six")
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["attempts"]) == ("completed", 2)
    events = await query(db_url, "select attempt, status, error_code from assistant_inference_events order by attempt")
    assert [(e["status"], e["error_code"]) for e in events] == [("failed", "model_failed"), ("succeeded", None)]
    [reply] = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert reply["content"] == "You said: one two three four five six"
    second = [d for d in received if d["run_id"] == str(run["id"])]
    assert sum(d["done"] for d in second) == 2  # each attempt closes its stream


async def test_a_broken_stream_falls_back_to_polling_without_loss(db_url, simulator) -> None:
    simulator.latency = 0.4
    simulator.inject(Fault("stream_break"))
    user, thread = await new_user_thread(db_url)
    async with listening(db_url) as received, streaming_worker(simulator, db_url):
        message = await say(db_url, user, thread, " ".join(f"word{i}" for i in range(30)))
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["attempts"]) == ("completed", 1)
    [reply] = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert reply["content"] == "You said: " + " ".join(f"word{i}" for i in range(30))
    partial = joined([d for d in received if d["message_id"] == str(message)]).strip()
    assert reply["content"].startswith(partial) and len(partial) < len(reply["content"])  # cut, then completed
    polls = [r for r in simulator.requests if r.method == "GET" and r.path.startswith("/v1/predictions/")]
    assert polls  # the prediction was polled once the stream broke


async def test_a_stream_that_falls_silent_is_not_waited_for_until_the_deadline(db_url, simulator, caplog) -> None:
    # The stream stops halfway and stays open while the prediction ends: after
    # STREAM_IDLE_POLL_SECONDS of silence the prediction is read, found ended and used, instead
    # of waiting for the stream until PREDICTION_TIMEOUT_SECONDS (an hour here).
    simulator.latency = 0.4
    simulator.inject(Fault("stream_stall"))
    user, thread = await new_user_thread(db_url)
    async with listening(db_url) as received, streaming_worker(simulator, db_url, stream_idle_poll_seconds=0.3,
                                                               prediction_timeout_seconds=3600):
        message = await say(db_url, user, thread, " ".join(f"word{i}" for i in range(30)))
        [run] = await finished_runs(db_url, 1, timeout=20)
    assert (run["status"], run["attempts"]) == ("completed", 1)
    [reply] = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert reply["content"] == "You said: " + " ".join(f"word{i}" for i in range(30))
    partial = joined([d for d in received if d["message_id"] == str(message)]).strip()
    assert reply["content"].startswith(partial) and len(partial) < len(reply["content"])  # silent, then completed
    assert any(getattr(r, "event", None) == "stream.quiet" for r in caplog.records)
    assert not any(getattr(r, "event", None) == "stream.broken" for r in caplog.records)


async def test_on_supabase_the_reply_streams_over_private_broadcast(db_url, simulator) -> None:
    simulator.latency = 0.5
    emulator = SupabaseEmulator(db_url)
    await emulator.start()
    user, thread = await new_user_thread(db_url)
    worker, task, http = await start_worker(supabase_settings(simulator, emulator, stream_publish_interval_ms=0))
    try:
        await wait_until(checking(lambda: worker.wakeups.live), what="the subscription")
        message = await say(db_url, user, thread, "stream this over broadcast")
        await finished_runs(db_url, 1)
    finally:
        await stop_worker(worker, task, http)
        await emulator.stop()
    messages = [b for b in emulator.broadcasts if b["payload"]["message_id"] == str(message)]
    assert messages and {(b["topic"], b["event"], b["private"], b["role"]) for b in messages} == \
        {(f"thread:{thread}", "reply_delta", True, "service_role")}
    [reply] = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert joined([b["payload"] for b in messages]).strip() == reply["content"]


def test_only_the_threads_owner_may_join_its_broadcast_topic(conn) -> None:
    owner, other = create_user(conn), create_user(conn)
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (owner,)).fetchone()[0]
    conn.execute("insert into realtime.messages (topic, extension, event, private) values (%s, 'broadcast', 'probe', true)",
                 (f"thread:{thread}",))

    def can_read(actor: postgrest.Actor, topic: str) -> bool:
        # How Realtime authorizes a private channel: the topic in realtime.topic(), then a read
        # of realtime.messages under the user's role and claims.
        with request(conn, actor) as cur:
            cur.execute("select set_config('realtime.topic', %s, true)", (topic,))
            return cur.execute("select count(*) from realtime.messages where topic = %s", (topic,)).fetchone()[0] > 0

    assert can_read(postgrest.user("o", owner), f"thread:{thread}")
    assert not can_read(postgrest.user("x", other), f"thread:{thread}")
    assert not can_read(postgrest.user("o", owner), "thread:not-a-thread")
    with request(conn, postgrest.anon()) as cur:
        cur.execute("select set_config('realtime.topic', %s, true)", (f"thread:{thread}",))
        assert cur.execute("select count(*) from realtime.messages").fetchone()[0] == 0


def test_no_client_may_send_on_a_threads_broadcast_topic(conn) -> None:
    # Realtime authorizes a client's send on a private channel by an insert into realtime.messages
    # under the client's role and claims (rolled back): with no insert policy, nobody but the
    # service role can put words in the assistant's mouth, not even the thread's owner.
    owner, other = create_user(conn), create_user(conn)
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (owner,)).fetchone()[0]
    topic = f"thread:{thread}"
    forge = ("insert into realtime.messages (topic, extension, event, payload, private)"
             " values (%s, 'broadcast', 'reply_delta', '{\"delta\": \"forged\"}', true)")
    for actor in (postgrest.user("o", owner), postgrest.user("x", other), postgrest.anon()):
        with request(conn, actor) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            cur.execute("select set_config('realtime.topic', %s, true)", (topic,))
            cur.execute(forge, (topic,))
    with request(conn, postgrest.service()) as cur:
        cur.execute(forge, (topic,))
        assert cur.rowcount == 1


@pytest.mark.parametrize(("text", "visible"), [
    ("Hello", "Hello"), ("Hello <", "Hello "), ("Hello <<fol", "Hello "), ("Hi\n<<follow-ups>>\n1. More?", "Hi\n"),
    ('Sure <<action>> {"type": "x"}', "Sure "), ("a << b", "a << b"),
])
def test_markers_are_never_shown_while_streaming(text: str, visible: str) -> None:
    assert visible_text(text) == visible


def held_back_by_brute_force(text: str) -> str:
    """The rule spelled out: cut at the first marker, then drop the longest tail that a marker
    starts with."""
    cut = min((i for i in (text.find(m) for m in MARKERS) if i >= 0), default=len(text))
    visible = text[:cut]
    for size in range(len(visible), 0, -1):
        if any(m.startswith(visible[-size:]) for m in MARKERS):
            return visible[:-size]
    return visible


@given(st.text(alphabet=st.sampled_from(list("<>abcfiknolotuw-s \n")), max_size=60))
def test_the_held_back_tail_is_exactly_what_may_start_a_marker(text: str) -> None:
    assert visible_text(text) == held_back_by_brute_force(text)


async def test_the_batcher_sends_what_queued_meanwhile_together_in_order_and_reports_failures() -> None:
    sent: list[list[int]] = []
    gate = asyncio.Event()

    async def send(items: list[int]) -> None:
        if not sent:
            await gate.wait()  # the first batch is on its way while more items are submitted
        sent.append(items)
        if 13 in items:
            raise RuntimeError("refused")

    batcher: Batcher[int, None] = Batcher(send, max_batch=3)
    first = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(n)) for n in (2, 3, 4, 5)]
    await asyncio.sleep(0)
    assert sent == [] and not first.done()
    gate.set()
    await asyncio.gather(first, *rest)
    assert sent == [[1], [2, 3, 4], [5]]  # one batch in flight at a time, at most max_batch each

    failing = [asyncio.create_task(batcher.submit(n)) for n in (12, 13)]
    results = await asyncio.gather(*failing, return_exceptions=True)
    assert sent[-1] == [12, 13]
    assert all(isinstance(r, RuntimeError) for r in results)  # every item of the batch hears why
    await batcher.submit(14)  # and the batcher goes on
    assert sent[-1] == [14]


async def test_a_keyed_batcher_sends_one_item_per_key_in_a_batch_and_keeps_the_order() -> None:
    """As the worker batches completions (one per user: see Worker.completions)."""
    sent: list[list[str]] = []
    gate = asyncio.Event()

    async def send(items: list[str]) -> None:
        if not sent:
            await gate.wait()
        sent.append(items)

    batcher: Batcher[str, None] = Batcher(send, max_batch=3, key=lambda item: item[0])  # the key: its letter
    first = asyncio.create_task(batcher.submit("a0"))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(batcher.submit(item)) for item in ("a1", "b1", "a2", "c1", "d1", "b2")]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *rest)
    assert sent == [["a0"], ["a1", "b1", "c1"], ["a2", "d1", "b2"]]


async def test_many_replies_streaming_at_once_share_notify_statements(db_url, simulator, monkeypatch) -> None:
    """Eight replies streaming together: every delta arrives, in order per reply, in fewer
    statements than deltas. The first statement is held until two more deltas are waiting, so
    that the batching is seen however the replies happen to interleave."""
    batches: list[int] = []
    submitted = 0
    original_send, original_publish = NotifyPublisher._send, NotifyPublisher.publish

    async def counted_publish(self: NotifyPublisher, thread_id: uuid.UUID, payload: dict) -> None:
        nonlocal submitted
        submitted += 1
        await original_publish(self, thread_id, payload)

    async def counted_send(self: NotifyPublisher, payloads: list[str]) -> None:
        if not batches:
            deadline = time.monotonic() + 10
            while submitted < len(payloads) + 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        batches.append(len(payloads))
        await original_send(self, payloads)

    monkeypatch.setattr(NotifyPublisher, "publish", counted_publish)
    monkeypatch.setattr(NotifyPublisher, "_send", counted_send)
    simulator.latency = 0.4
    pairs = [await new_user_thread(db_url) for _ in range(8)]
    async with listening(db_url) as received, streaming_worker(simulator, db_url, stream_publish_interval_ms=20):
        for user, thread in pairs:
            await say(db_url, user, thread, "Tell me about scarves")
        await finished_runs(db_url, len(pairs))

        async def all_closed() -> bool:
            return sum(1 for m in received if m["done"]) == len(pairs)

        await wait_until(all_closed, 10, "every stream closed")
    by_run: dict[str, list[dict]] = {}
    for message in received:
        by_run.setdefault(message["run_id"], []).append(message)
    assert len(by_run) == len(pairs)
    for messages in by_run.values():
        assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    replies = await query(db_url, "select content from assistant_messages where role = 'assistant'")
    assert sorted(joined(ms).strip() for ms in by_run.values()) == sorted(r["content"] for r in replies)
    assert sum(batches) == len(received) and len(batches) < len(received) and max(batches) > 1


class RecordingPublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def publish(self, thread_id: uuid.UUID, payload: dict[str, Any]) -> None:
        self.sent.append((payload["run_id"], payload))


class FailingPublisher:
    async def publish(self, thread_id: uuid.UUID, payload: dict[str, Any]) -> None:
        raise RuntimeError("broadcast refused: HTTP 429")


async def test_replies_streaming_at_once_share_the_workers_message_budget(monkeypatch) -> None:
    """With a budget of 2 messages a second and two replies streaming, each publishes once a
    second (not every 100 ms); when one closes its stream, the other's share grows back."""
    from worker import streaming
    from worker.streaming import ReplyRelay, StreamBudget

    now = [1000.0]
    monkeypatch.setattr(streaming.time, "monotonic", lambda: now[0])
    budget, publisher = StreamBudget(2), RecordingPublisher()
    first, second = (ReplyRelay(publisher, uuid.uuid4(), run, uuid.uuid4(), 0.1, budget) for run in (uuid.uuid4(), uuid.uuid4()))
    sent = lambda relay: [p["delta"] for r, p in publisher.sent if r == relay.base["run_id"]]  # noqa: E731

    await first.update("a")
    await second.update("b")
    assert budget.streaming == 2 and sent(first) == ["a"] and sent(second) == ["b"]  # the first token at once
    for step in range(1, 10):  # 0.1 s steps: each would publish at every one without the budget
        now[0] += 0.1
        await first.update("a" + "x" * step)
    assert sent(first) == ["a"]  # 0.9 s: not yet
    now[0] += 0.1
    await first.update("a" + "x" * 10)
    assert sent(first) == ["a", "x" * 10]  # 1 s = 2 replies / 2 messages a second

    await second.flush(done=True)  # closes its stream: one reply streams now
    assert budget.streaming == 1 and sent(second)[-1] == ""
    now[0] += 0.5
    await first.update("a" + "x" * 11)
    assert sent(first)[-1] == "x"  # 0.5 s = 1 reply / 2 messages a second

    failing = ReplyRelay(FailingPublisher(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), 0.1, budget)
    await failing.update("c")  # publishing failed: the reply goes on, the live view is given up
    assert budget.streaming == 2
    await failing.flush(done=True)
    await first.flush(done=True)
    assert budget.streaming == 0  # every share given back, a failed stream's too
    await first.update("a" + "x" * 12)  # text after the stream closed (a reader that outlived it)
    assert budget.streaming == 0 and sent(first)[-1] == ""  # neither counted nor sent

    unbudgeted = ReplyRelay(publisher, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), 0.1, StreamBudget(0))
    await unbudgeted.update("d")
    now[0] += 0.1
    await unbudgeted.update("de")
    assert sent(unbudgeted) == ["d", "e"]  # 0: the interval alone


async def test_a_reply_streams_only_while_the_budget_can_give_every_stream_a_delta_each_interval() -> None:
    """STREAM_MAX_INTERVAL_MS: with 2 messages a second and at most 1 s between deltas, two
    replies may stream at once; a third is written whole until one of them closes its stream."""
    from worker.streaming import ReplyRelay, StreamBudget

    publisher, budget = RecordingPublisher(), StreamBudget(2, 1.0)

    def relay() -> ReplyRelay | None:
        return ReplyRelay.open(publisher, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), 0.1, budget)

    first, second, third = relay(), relay(), relay()
    assert first is not None and second is not None and third is None and budget.open == 2
    await first.update("a")
    await first.flush(done=True)  # text streamed, then closed: both shares given back
    assert (budget.open, budget.streaming) == (1, 0)
    fourth = relay()
    assert fourth is not None and relay() is None
    await second.flush(done=True)  # never streamed text: its admission is given back all the same
    await fourth.flush(done=True)
    await fourth.flush(done=True)  # closing twice gives back once
    assert (budget.open, budget.streaming) == (0, 0)
    for unlimited in (StreamBudget(0, 1.0), StreamBudget(2, 0)):  # no budget, or no slowest interval
        assert all(ReplyRelay.open(publisher, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), 0.1, unlimited)
                   for _ in range(10))


async def test_replies_past_the_stream_budget_are_written_whole_without_an_event_stream(db_url, simulator) -> None:
    """Three replies due at once under a budget that lets two stream: the third prediction is
    created with `Prefer: wait`, its stream URL is never read and no delta names it; all three
    replies are written, and the worker counts two streamed and one whole. Once the streams have
    closed, the next reply streams again."""
    simulator.latency = 1.0
    pairs = [await new_user_thread(db_url) for _ in range(3)]
    messages = [await say(db_url, user, thread, f"Tell me about scarf number {n}") for n, (user, thread) in enumerate(pairs)]
    async with listening(db_url) as received, streaming_worker(simulator, db_url, stream_max_messages_per_second=2,
                                                               stream_max_interval_ms=1000) as worker:
        await finished_runs(db_url, 3)
        await wait_until(checking(lambda: sum(d["done"] for d in received) == 2), what="both streams closed")
        outcomes = {o: worker.metrics.reply_streams.labels(o)._value.get() for o in ("streamed", "whole")}
        assert outcomes == {"streamed": 2, "whole": 1}
        # Given back by each relay's closing flush, once its closing delta is published.
        await wait_until(checking(lambda: (worker.stream_budget.open, worker.stream_budget.streaming) == (0, 0)),
                         what="the budget's shares given back")
        user, thread = pairs[0]
        later = await say(db_url, user, thread, "And about gloves?")
        await finished_runs(db_url, 4)
        await wait_until(checking(lambda: any(d["done"] and d["message_id"] == str(later) for d in received)),
                         what="the later reply's stream closed")
    assert sorted(len(c.headers.get("Prefer", "")) > 0 for c in simulator.creates) == [False, False, False, True]
    assert len([r for r in simulator.requests if r.path.startswith("/v1/streams/")]) == 3
    streamed = {d["message_id"] for d in received}
    assert len(streamed & {str(m) for m in messages}) == 2 and str(later) in streamed
    replies = await query(db_url, "select reply_to, content from assistant_messages where role = 'assistant'")
    assert sorted(str(r["reply_to"]) for r in replies) == sorted(str(m) for m in [*messages, later])
    whole = ({str(m) for m in messages} - streamed).pop()
    assert next(r["content"] for r in replies if str(r["reply_to"]) == whole).startswith("You said: Tell me about scarf")
