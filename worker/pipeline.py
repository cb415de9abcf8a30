"""The worker: claims due runs, asks the routed model for each reply, and hands the result back to
SQL. Every state change is one SQL function call (see store.py), so the worker can die at any
instant without losing or doubling a reply: its leases expire and another worker takes over."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from worker import jsonload
from worker.actions import ActionRegistry, default_registry
from worker.attachments import ImageResolver
from worker.batching import Batcher
from worker.byok import UserTokens
from worker.config import Settings
from worker.knowledge import Embedder, retrieve
from worker.observability import Metrics
from worker.prompts import (
    ActionSpec,
    Assistant,
    KnowledgeChunk,
    ModelRequest,
    build_request,
    estimate_tokens,
    parse_reply,
)
from worker.provider import (
    RECOVERY_MIN_SECONDS,
    Prediction,
    PredictionHandle,
    ProviderError,
    ReplicateClient,
    active_seconds,
    estimate_cost,
)
from worker.retries import retried
from worker.store import ClaimedRun, Completion, RunGone, RunStore, StoreUnavailable
from worker.streaming import Publisher, ReplyRelay, StreamBudget

log = logging.getLogger("worker.pipeline")
T = TypeVar("T")
COMPLETE_BATCH = 50  # replies per complete_runs call


def partial_text(output: Any) -> str:
    """The text of a prediction's output so far (a string, or a list of strings), else ''."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return "".join(item for item in output if isinstance(item, str))
    return ""


class Wakeups(Protocol):
    live: bool

    async def run(self, wake: Callable[..., None]) -> None: ...


# A run put back in the queue by the claim, to wait for its user's replies in flight (a token or
# cost limit they could go past together: migration 20261123001300), due again this much later.
WAITING_FOR_REPLIES = "replies_in_flight"
WAITING_FOR_REPLIES_SECONDS = 1.0
# Runs claim_runs ended itself: failed (their assistant withdrawn from their user meanwhile, or
# the lease of their last attempt expired: migration 20261123001900), or cancelled (their user
# asked while the lease of their attempt ran out).
FAILED_AT_CLAIM = frozenset({"assistant_unavailable", "lease_expired"})
CANCELLED_AT_CLAIM = "cancelled"


class Worker:
    def __init__(self, settings: Settings, store: RunStore, provider: ReplicateClient, wakeups: Wakeups, *,
                 images: ImageResolver | None = None, actions: ActionRegistry = default_registry,
                 publisher: Publisher | None = None) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.wakeups = wakeups
        self.images = images or ImageResolver(settings, store)
        self.actions = actions
        self.embedder = Embedder(provider, settings)
        self.inflight: dict[uuid.UUID, asyncio.Task[None]] = {}
        self.action_tasks: set[asyncio.Task[str]] = set()
        self.counts: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._actions_due = True
        # Whether runs may be due that the last claim left behind (a full batch, or a hint that
        # came while every slot was busy). Only then does a finished run trigger a claim: an
        # empty claim after every reply would cost the database more than the replies.
        self._backlog = True
        self.user_tokens = UserTokens(store, settings.byok_encryption_key)
        jsonload.allow_jsonb_integers()  # a profile's 1e5000 is read, not a claim failed
        self.metrics = Metrics()
        self.provider.on_lost_create = lambda outcome: self.metrics.lost_creates.labels(outcome).inc()
        self.publisher = publisher if settings.stream_replies else None
        self.stream_budget = StreamBudget(settings.stream_max_messages_per_second,
                                          settings.stream_max_interval_ms / 1000)
        self.cancelling: set[uuid.UUID] = set()
        # Runs whose reply is on its way to the database: no longer cancelled by the worker
        # (complete_runs ends a run cancelled meanwhile itself, and counts what it consumed once).
        self.completing: set[uuid.UUID] = set()
        # Cancelled runs whose create was still on its way: what it consumed is recorded once it answers.
        self.recording: set[asyncio.Task[None]] = set()
        # Attempts whose lease was lost (taken over, by another worker or by this one): stopped,
        # their prediction cancelled, recorded as lease_lost; the attempt that holds the lease answers.
        self.abandoned: set[asyncio.Task[None]] = set()
        self._check_cancellations = asyncio.Event()
        # One reply per user in a batch: a user's delete of several of their threads (or of a
        # thread's messages) in one statement locks them in its scan order, which a batch's
        # locks in id order could cross (a deadlock); one per user, they cannot.
        self.completions: Batcher[Completion, uuid.UUID | None] = Batcher(
            self._complete_batch, COMPLETE_BATCH, key=lambda completion: completion.run.user_id)

    # -- the loop -------------------------------------------------------------------------------
    def wake(self, kind: str = "runs") -> None:
        """A hint that work may be waiting: "runs" (a user message) or "actions" (an approval)."""
        if kind == "actions":
            self._actions_due = True
        if kind == "cancel":
            self._check_cancellations.set()
            return
        if len(self.inflight) >= self.settings.worker_concurrency:
            self._backlog = True  # work arrived while every slot is busy: claim when one frees up
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Until stop(): claim and process; then drain within the shutdown grace period."""
        wakeups = asyncio.create_task(self.wakeups.run(self.wake), name="wakeups")
        maintenance = asyncio.create_task(self._maintenance(), name="maintenance")
        cancellations = asyncio.create_task(self._watch_cancellations(), name="cancellations")
        log.info("worker started", extra={"event": "worker.started", "worker_id": self.settings.worker_id,
                                          "concurrency": self.settings.worker_concurrency})
        try:
            await self._store_call(lambda: self.store.call("register_action_types", {"p_types": self.actions.as_rows()}))
            await self._claim_loop()
        finally:
            for task in (wakeups, maintenance, cancellations):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._drain()
            log.info("worker stopped", extra={"event": "worker.stopped", "counts": dict(self.counts)})

    async def _claim_loop(self) -> None:
        backoff = 0.2
        while not self._stopping.is_set():
            self._wake.clear()
            free = self.settings.worker_concurrency - len(self.inflight)
            full_batch = False
            if free > 0:
                batch = min(free, self.settings.worker_claim_batch)
                try:
                    runs = await self.store.claim(self.settings.worker_id, batch, self.settings.worker_lease_seconds,
                                                  chat_model=self.settings.chat_model.slug,
                                                  vision_model=self.settings.vision_model.slug)
                    backoff = 0.2
                except Exception as exc:  # the database is away: keep trying, never exit
                    self.counts["claim_errors"] += 1
                    self.metrics.store_errors.inc()
                    log.warning("claim failed", extra={"event": "claim.failed", "error": str(exc)[:200]})
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                waits = 0
                for run in runs:
                    if run.blocked_code == WAITING_FOR_REPLIES:  # back in the queue for a second
                        waits += 1
                    elif run.blocked_code in FAILED_AT_CLAIM or run.blocked_code == CANCELLED_AT_CLAIM:
                        # Ended by the claim (failed and answered, or cancelled).
                        previous = self.inflight.get(run.run_id)
                        if previous is not None and not previous.done():
                            # Taken over from this worker's own attempt (its lease ran out): as in
                            # _start, that attempt stops and its prediction is cancelled.
                            self._abandon(previous, run, "reclaimed")
                        if run.blocked_code == CANCELLED_AT_CLAIM:
                            self._count_cancelled()
                        else:
                            self._count_failed(run.blocked_code, run_ended=True)
                    elif run.blocked_code:  # refused at admission and already answered by the database
                        self.counts["blocked"] += 1
                        self.metrics.blocked.labels(run.blocked_code).inc()
                    else:
                        self._start(run)
                if waits:  # due again in a second (the exact time is the database's; this is a hint)
                    self.counts["waited"] += waits
                    asyncio.get_running_loop().call_later(WAITING_FOR_REPLIES_SECONDS + 0.05, self.wake)
                full_batch = len(runs) >= batch  # (the runs a claim ends come back beside those it takes)
                self._backlog = full_batch
            if self._actions_due:
                await self._claim_actions()
            if full_batch:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.settings.worker_sweep_interval_seconds)
            except asyncio.TimeoutError:
                self._actions_due = True  # the sweep looks for approved actions too

    async def _claim_actions(self) -> None:
        """Executes approved action requests (their own small lane, next to the runs)."""
        self._actions_due = False
        try:
            requests = await self.store.call("claim_action_requests", {
                "p_worker": self.settings.worker_id, "p_limit": 10, "p_lease_seconds": 60}, rows=True)
        except Exception as exc:
            self._actions_due = True
            log.warning("action claim failed", extra={"event": "action.claim_failed", "error": str(exc)[:200]})
            return
        for request in requests:
            task = asyncio.create_task(self.actions.execute(self.store, request))
            self.action_tasks.add(task)
            task.add_done_callback(self.action_tasks.discard)
            self.counts["actions"] += 1

    async def _maintenance(self) -> None:
        """Background upkeep every few seconds: queue gauges, BYOK tokens set without Vault to
        encrypt, operator reports to refresh and usage windows to prune when due."""
        refresh_every = self.settings.usage_report_refresh_seconds
        prune_every = self.settings.usage_prune_interval_seconds
        # Due at once: loop.time() is a monotonic clock whose zero is not defined (the boot, on
        # Linux), so 0.0 would put the first refresh and prune off on a host up for less than
        # an interval.
        last_refresh = last_prune = float("-inf")
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.check_database()
                await self.user_tokens.encrypt_pending()
                if refresh_every and loop.time() - last_refresh >= refresh_every:
                    await self.store.refresh_usage_reports()
                    last_refresh = loop.time()
                if prune_every and loop.time() - last_prune >= prune_every:
                    await self._prune_usage_windows()
                    last_prune = loop.time()
            except Exception as exc:
                log.warning("maintenance failed", extra={"event": "maintenance.failed", "error": str(exc)[:200]})
            await asyncio.sleep(min(self.settings.worker_sweep_interval_seconds, 5.0))

    async def _prune_usage_windows(self, batch: int = 10000, most: int = 100) -> None:
        """Deletes the usage windows past their retention, a batch per transaction (each short:
        admissions lock their users' current windows meanwhile), at most `most` batches a round."""
        deleted = 0
        for _ in range(most):
            pruned = await self.store.prune_usage_windows(batch)
            deleted += pruned
            if pruned < batch:
                break
        if deleted:
            log.info("usage windows pruned", extra={"event": "usage.pruned", "windows": deleted})

    async def _watch_cancellations(self) -> None:
        """Stops the runs their users cancelled: at once on a hint (NOTIFY assistant_cancel),
        otherwise within a second (one query for all runs in flight)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._check_cancellations.wait(), timeout=1.0)
            self._check_cancellations.clear()
            if not self.inflight:
                continue
            try:
                flagged = await self.store.cancelled_runs(list(self.inflight))
            except Exception as exc:
                log.warning("cancellation check failed", extra={"event": "cancel.check_failed", "error": str(exc)[:200]})
                continue
            for run_id in flagged:
                task = self.inflight.get(run_id)
                if task is not None and run_id not in self.cancelling and run_id not in self.completing:
                    self.cancelling.add(run_id)
                    task.cancel()

    async def check_database(self) -> None:
        """One cheap call: proves the database answers and samples the queue."""
        status = await self.store.queue_status()
        self.metrics.queue_depth.set(status.due_now)
        self.metrics.queue_in_progress.set(status.in_progress)
        self.metrics.wakeups_live.set(1 if self.wakeups.live else 0)

    async def not_ready_because(self) -> str | None:
        """None when ready: the database answers and wake-ups are live."""
        try:
            await self.check_database()
        except Exception as exc:
            return f"database unavailable: {type(exc).__name__}"
        if not self.wakeups.live:
            return "the wake-up subscription is not live"
        return None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def _start(self, run: ClaimedRun) -> None:
        self.counts["claimed"] += 1
        self.metrics.claimed.inc()
        log.info("run claimed", extra={"event": "run.claimed", "run_id": str(run.run_id),
                                       "message_id": str(run.message_id), "attempt": run.attempt})
        previous = self.inflight.get(run.run_id)
        after: asyncio.Task[None] | None = None
        if previous is not None and not previous.done():
            # This worker's own lease on the run ran out (a stalled loop, a database outage) and
            # the claim gave the run back to it as a new attempt. The old one is abandoned, unless
            # it is writing its reply: then the new one waits for it (the first reply written is
            # the run's) and goes on only if the run is still unanswered.
            if run.run_id in self.completing:
                after = previous
            else:
                self._abandon(previous, run, "reclaimed")
        task = asyncio.create_task(self._process(run, after), name=f"run-{run.run_id}")
        self.inflight[run.run_id] = task
        self.metrics.in_flight.set(len(self.inflight))

        def done(finished: asyncio.Task[None]) -> None:
            if self.inflight.get(run.run_id) is finished:  # not a newer attempt of the same run
                del self.inflight[run.run_id]
                self.cancelling.discard(run.run_id)  # not before: the watcher would cancel it again
            self.metrics.in_flight.set(len(self.inflight))
            if self._backlog:
                self._wake.set()  # a slot is free and runs may be waiting for one

        task.add_done_callback(done)

    def _abandon(self, task: asyncio.Task[None], run: ClaimedRun, why: str) -> None:
        """Stops an attempt whose lease is no longer this worker's (`run`: the attempt that lost
        it, or for "reclaimed" the one that took it over). Its prediction is cancelled at
        Replicate (by the provider, as for any cancelled task). A reply it is already writing is
        not abandoned (checked here, at the moment of cancelling): the first reply written is the
        run's, whichever attempt wrote it (reply_to is unique)."""
        if task in self.abandoned or (run.run_id in self.completing and self.inflight.get(run.run_id) is task):
            return  # writing its reply: the first reply written is the run's
        self.abandoned.add(task)
        task.add_done_callback(self.abandoned.discard)
        self.counts["abandoned"] += 1
        self.metrics.abandoned.inc()
        log.warning("attempt abandoned: its lease is no longer ours", extra={
            "event": "run.abandoned", "run_id": str(run.run_id), "reason": why,
            ("taken_over_by_attempt" if why == "reclaimed" else "attempt"): run.attempt})
        task.cancel()

    async def _drain(self) -> None:
        """Stop claiming; let in-flight runs finish within the grace period; release the rest;
        then wait for the creates those left on their way, so their predictions are cancelled."""
        pending: list[asyncio.Task[Any]] = [*self.inflight.values(), *self.action_tasks]
        if pending:
            log.info("draining", extra={"event": "worker.draining", "in_flight": len(pending)})
            _, still_running = await asyncio.wait(pending, timeout=self.settings.worker_shutdown_grace_seconds)
            completing = {self.inflight.get(run_id) for run_id in self.completing}
            cancelled = [task for task in still_running if task not in completing]
            for task in cancelled:  # a reply on its way to the database is let through
                task.cancel()
            if still_running:
                log.info("grace period over", extra={"event": "worker.grace_over", "cancelled": len(cancelled),
                                                     "replies_let_through": len(still_running) - len(cancelled)})
                await asyncio.wait(still_running, timeout=10)

        def settling() -> list[asyncio.Task[None]]:
            return [t for t in (*self.provider.settling, *self.recording, *self.abandoned) if not t.done()]

        waiting = settling()
        if waiting:
            # A create held by Prefer: wait answers within the wait, else its read timeout ends it
            # and the search for the prediction it may have started; then the cancel at Replicate
            # (its own timeout) and the record in the database.
            bound = (self.settings.replicate_prefer_wait_seconds + 2 * self.settings.replicate_timeout_seconds
                     + max(self.settings.replicate_timeout_seconds, RECOVERY_MIN_SECONDS) + 5)
            log.info("waiting for creates on their way, to cancel their predictions",
                     extra={"event": "worker.settling", "creates": len(waiting)})
            deadline = asyncio.get_running_loop().time() + bound
            # Again until nothing is left: an abandoned attempt that ends meanwhile starts the
            # task that records it.
            while waiting and (left := deadline - asyncio.get_running_loop().time()) > 0:
                await asyncio.wait(waiting, timeout=left)
                waiting = settling()
            if waiting:
                log.warning("creates still unanswered at shutdown; their predictions may run on at Replicate",
                            extra={"event": "worker.settle_abandoned", "creates": len(waiting)})

    # -- one run --------------------------------------------------------------------------------
    async def _process(self, run: ClaimedRun, after: asyncio.Task[None] | None = None) -> None:
        me = asyncio.current_task()
        assert me is not None
        lease = asyncio.create_task(self._keep_lease(run, me))
        request: ModelRequest | None = None
        handle = PredictionHandle()
        replying = False  # the prediction succeeded and its reply is being written
        try:
            if after is not None:  # an earlier attempt of this run is writing its reply (see _start)
                await asyncio.wait([after])  # the lease is kept meanwhile; a cancellation is handled below
                if self._stopping.is_set():  # not a new prediction during shutdown: give the run back
                    if await self._store_call(lambda: self.store.release(run, self.settings.worker_id)):
                        self.counts["released"] += 1  # (not when the earlier attempt answered it)
                        self.metrics.released.inc()
                    return
                if not await self._store_call(lambda: self.store.extend_lease(run, self.settings.worker_id,
                                                                             self.settings.worker_lease_seconds)):
                    log.info("run ended by its earlier attempt", extra={
                        "event": "run.answered_before", "run_id": str(run.run_id), "attempt": run.attempt})
                    return
            assistant = Assistant.from_row(run.assistant, self.settings)
            try:
                if run.assistant and run.assistant.get("is_active") is False:
                    # Deactivated after this run was queued, and the run came back to the queue
                    # (a failed attempt): withdrawing it ended the runs queued then, not this one.
                    raise ProviderError("assistant_unavailable", f"assistant {run.assistant.get('slug')} is inactive",
                                        retryable=False)
                image = await self.images.model_url(run.image_url, run.user_id) if run.image_url else None
                # The user's own token, when the plan says so, pays for every prediction of the
                # request, the knowledge lookup's embedding included.
                token = await self.user_tokens.token_for(run.user_id) if run.uses_own_key else None
                knowledge, knowledge_error = await self._knowledge(run, assistant, token)
                request = build_request(self.settings, run.history, run.content, image, assistant=assistant,
                                        profile=run.profile, knowledge=knowledge,
                                        actions=[ActionSpec(t.name, t.description) for t in self.actions.types.values()])
                # Only the prompt needed the history (50 messages as Python objects, about 20 KB): not
                # held for the seconds the prediction takes, times the runs in flight.
                run.history.clear()  # the run owns this list (ClaimedRun.from_row copies it)
                # Streamed if the budget has room, else written whole (STREAM_MAX_INTERVAL_MS).
                relay = (ReplyRelay.open(self.publisher, run.thread_id, run.run_id, run.message_id,
                                         self.settings.stream_publish_interval_ms / 1000, self.stream_budget)
                         if self.publisher else None)
                try:  # (the relay's share of the budget is given back by its closing flush)
                    if self.publisher:
                        self.metrics.reply_streams.labels("streamed" if relay else "whole").inc()
                    prediction = await self.provider.predict(request.model, request.input, token, handle=handle,
                                                             on_text=relay.update if relay else None)
                finally:
                    if relay:
                        await relay.flush(done=True)
            except ProviderError as exc:
                if run.uses_own_key and exc.code in ("unauthorized", "billing_required"):
                    # The user's own account answered: say so, not "the assistant is misconfigured".
                    exc.code = "byok_token_invalid" if exc.code == "unauthorized" else "byok_billing_required"
                await self._fail(run, request, exc, handle)
                return
            replying = True
            await self._complete(run, request, prediction, knowledge_error)
        except RunGone:
            # The user deleted the message or thread meanwhile: nothing to answer any more. A
            # reply that was produced is charged all the same, as a cancelled request is.
            self.counts["gone"] += 1
            log.info("run gone", extra={"event": "run.gone", "run_id": str(run.run_id)})
            if replying:
                await self._record_orphaned(run, self._consumed(run, request, handle))
        except asyncio.CancelledError:
            if me in self.abandoned:
                # The lease is another attempt's now: the run is not ours to give back. The
                # prediction was cancelled at Replicate by the provider (or will be, once its
                # create answers); what it consumed is recorded on this attempt's own event.
                self._recording(self._record_abandoned(run, request, handle))
                return
            if run.run_id in self.cancelling:
                # The user cancelled: the prediction was cancelled at Replicate by the provider (or
                # will be, once its create answers). No reply. One task records it all, so that a
                # second cancellation (shutdown) cannot cut it short; shutdown waits for it.
                ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._recording(self._finish_cancelled(run, request, handle, ended))
                await asyncio.shield(ended)  # the run has ended: its slot is free
                return
            # Shutdown past the grace period: give the run back untouched (the prediction was
            # cancelled at Replicate by the provider, or will be once its create answers).
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.release(run, self.settings.worker_id))
            self.counts["released"] += 1
            self.metrics.released.inc()
            raise
        except Exception as exc:
            log.exception("run crashed", extra={"event": "run.crashed", "run_id": str(run.run_id)})
            # The run's row is its user's to read: the exception's kind, not its text (which can
            # hold SQL, the worker's data or another service's answer); the log has it all.
            error = ProviderError("internal_error", f"{type(exc).__name__} (the worker's log has the details)",
                                  retryable=True)
            try:
                await self._fail(run, request, error, handle)
            except Exception as again:  # the run waits for its lease to run out, then is taken over
                log.warning("recording a crashed run failed", extra={"event": "run.fail_record_failed",
                                                                      "run_id": str(run.run_id), "error": str(again)[:200]})
        finally:
            lease.cancel()

    def _consumed(self, run: ClaimedRun, request: ModelRequest | None, handle: PredictionHandle, *,
                  settled: bool = True) -> dict[str, Any]:
        """What a cancelled attempt consumed, from the state Replicate last reported: the model
        `not_started` when nothing was asked of Replicate; no prediction yet (id, counts) while
        its create is on its way or, `settled` false, its cancellation has not answered."""
        consumed: dict[str, Any] = {"attempt": run.attempt, "model": "not_started", "prediction_id": None,
                                    "input_tokens": None, "output_tokens": None, "cost_usd": None}
        if request is None or (handle.prediction_id is None and handle.settling is None):
            return consumed
        consumed["model"] = request.model.slug
        if handle.prediction_id is None or not settled:
            return consumed
        last = handle.last
        metrics = last.get("metrics")
        used = Prediction(handle.prediction_id, "", metrics if isinstance(metrics, dict) else {})
        input_tokens, output_tokens = used.input_tokens, used.output_tokens
        written = handle.streamed or partial_text(last.get("output"))
        if bool(last.get("started_at")) or bool(written) or last.get("status") in ("processing", "succeeded"):
            # A canceled prediction comes back without token counts; one that started had read
            # its prompt and written part of its reply: estimated, as for a reply without
            # counts, so that cancelling is no way around a token budget.
            input_tokens = request.prompt_tokens_estimate if input_tokens is None else input_tokens
            output_tokens = (estimate_tokens(written) if written else 0) if output_tokens is None else output_tokens
        predict_time = used.predict_time if used.predict_time is not None else active_seconds(last)
        cost = estimate_cost(request.model, input_tokens, output_tokens, predict_time)
        consumed.update(prediction_id=handle.prediction_id, input_tokens=input_tokens, output_tokens=output_tokens,
                        cost_usd=float(cost) if cost is not None else None)
        return consumed

    async def _finish_cancelled(self, run: ClaimedRun, request: ModelRequest | None, handle: PredictionHandle,
                                ended: asyncio.Future[None]) -> None:
        """Ends a run its user cancelled, with what its prediction consumed; `ended` is set then.
        A prediction whose create was still on its way when the run was cancelled is recorded
        once the create has answered and the prediction is cancelled: on the run's cancelled
        event and the user's usage (record_cancelled_consumption, once)."""
        # While the create or the cancel of its prediction is still on its way, the prediction is
        # recorded once they have answered (below).
        consumed = self._consumed(run, request, handle,
                                  settled=handle.settling is None or handle.settling.done())
        gone = False
        try:
            gone = not await self._store_call(lambda: self.store.finish_cancelled(run, consumed))
        except Exception as exc:  # the claim ends it cancelled once its lease has run out
            log.warning("ending a cancelled run failed", extra={"event": "run.cancel_record_failed",
                                                                "run_id": str(run.run_id), "error": str(exc)[:200]})
        finally:
            if not ended.done():
                ended.set_result(None)
        if gone:  # its message or thread was deleted: charged all the same
            self.counts["gone"] += 1
            log.info("run gone", extra={"event": "run.gone", "run_id": str(run.run_id),
                                        "prediction_id": handle.prediction_id})
            if consumed["prediction_id"] is not None:
                await self._record_orphaned(run, consumed)
        else:
            self._count_cancelled()
            self._paid(consumed)
            log.info("run cancelled", extra={"event": "run.cancelled", "run_id": str(run.run_id),
                                             "prediction_id": handle.prediction_id})
        if handle.settling is None or consumed["prediction_id"] is not None:
            return  # recorded with the end, or nothing was asked of Replicate
        late: dict[str, Any] = {"prediction_id": None}
        try:
            await handle.settling
            late = self._consumed(run, request, handle)
            if late["prediction_id"] is None:
                return  # the create failed: nothing was started, or nothing can be found
            if gone:
                await self._record_orphaned(run, late)
                return
            recorded = await self._store_call(lambda: self.store.record_cancelled_consumption(run, late))
        except Exception as exc:
            log.warning("recording a cancelled prediction failed", extra={
                "event": "run.cancel_record_failed", "run_id": str(run.run_id),
                "prediction_id": late["prediction_id"], "error": str(exc)[:200]})
            return
        if recorded:
            self._paid(late)

    def _recording(self, record: Coroutine[Any, Any, None]) -> None:
        """Runs `record` as a task of its own (a second cancellation cannot cut it short), which
        shutdown waits for (`self.recording`)."""
        task = asyncio.create_task(record)
        self.recording.add(task)
        task.add_done_callback(self.recording.discard)

    def _count_cancelled(self) -> None:
        """A run ended cancelled, in the counts and metrics."""
        self.counts["cancelled"] += 1
        self.metrics.cancelled.inc()

    def _count_failed(self, code: str, *, run_ended: bool) -> None:
        """A failed attempt in the counts and metrics; `run_ended`: it ended its run."""
        self.counts[f"failed.{code}"] += 1
        self.metrics.failed.labels(code).inc()
        if run_ended:
            self.metrics.runs_failed.labels(code).inc()

    async def _record_abandoned(self, run: ClaimedRun, request: ModelRequest | None, handle: PredictionHandle) -> None:
        """Records an abandoned attempt (a failed `lease_lost` event, not charged to the user),
        once a create still on its way has answered and its prediction has been cancelled."""
        if handle.settling is not None:
            with contextlib.suppress(Exception):
                await handle.settling
        consumed = self._consumed(run, request, handle)
        await self._record(run, consumed, lambda: self.store.record_abandoned_attempt(run, consumed),
                           "recording an abandoned attempt failed", "run.abandoned_record_failed", attempt=run.attempt)

    async def _record_orphaned(self, run: ClaimedRun, consumed: dict[str, Any]) -> None:
        """Charges what the prediction of a run deleted meanwhile consumed (once per prediction)."""
        if consumed["prediction_id"] is None:
            return
        await self._record(run, consumed, lambda: self.store.record_orphaned_consumption(run, consumed),
                           "recording a deleted request's prediction failed", "run.gone_record_failed")

    async def _record(self, run: ClaimedRun, consumed: dict[str, Any], record: Callable[[], Awaitable[bool]],
                      failure: str, event: str, **fields: Any) -> None:
        """Records what a prediction consumed with `record` (a store call, retried while the
        database is away); the cost metric counts it once recorded. A failure is only logged."""
        try:
            recorded = await self._store_call(record)
        except Exception as exc:
            log.warning(failure, extra={"event": event, "run_id": str(run.run_id), **fields,
                                        "prediction_id": consumed["prediction_id"], "error": str(exc)[:200]})
            return
        if recorded:
            self._paid(consumed)

    def _paid(self, consumed: dict[str, Any] | None) -> None:
        """The cost metric counts what a prediction consumed (a `_consumed` record), once it is recorded."""
        if consumed is not None and consumed["cost_usd"] is not None:
            self.metrics.cost.labels(consumed["model"]).inc(consumed["cost_usd"])

    async def _knowledge(self, run: ClaimedRun, assistant: Assistant,
                         token: str | None) -> tuple[list[KnowledgeChunk], str | None]:
        """Retrieved chunks for an assistant with a knowledge base (the query embedded with
        `token`: the user's own for BYOK, else the operator's). A failed retrieval does not fail
        the reply: it is answered without, and the reason is kept in its metadata."""
        if "knowledge_base" not in assistant.features:
            return [], None
        try:
            return await retrieve(self.store, self.embedder, self.settings, run.content, assistant_id=assistant.id,
                                  user_id=run.user_id, run_id=run.run_id, token=token), None
        except Exception as exc:  # a refusal, an outage, an embedding the database cannot take …
            code = (exc.code if isinstance(exc, ProviderError) else
                    "store_unavailable" if isinstance(exc, StoreUnavailable) else "retrieval_failed")
            log.warning("retrieval failed", extra={"event": "knowledge.failed", "run_id": str(run.run_id), "error_code": code})
            return [], code

    async def _keep_lease(self, run: ClaimedRun, task: asyncio.Task[None]) -> None:
        interval = self.settings.worker_lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.store.extend_lease(run, self.settings.worker_id, self.settings.worker_lease_seconds):
                    log.warning("lease lost", extra={"event": "run.lease_lost", "run_id": str(run.run_id)})
                    if await self._lease_lost(run, task):
                        return
            except Exception as exc:
                log.warning("lease renewal failed", extra={"event": "run.lease_error", "run_id": str(run.run_id),
                                                           "error": str(exc)[:200]})

    async def _lease_lost(self, run: ClaimedRun, task: asyncio.Task[None]) -> bool:
        """The lease could not be extended. A run its user cancelled or deleted is the
        cancellation watcher's (it records what was consumed); a reply on its way to the database
        goes on; any other run was taken over or ended by someone else: the attempt is abandoned.
        False when that could not be told (the database is away): the renewal goes on."""
        if run.run_id in self.cancelling or run.run_id in self.completing:
            return True
        try:
            if run.run_id in await self.store.cancelled_runs([run.run_id]):
                self._check_cancellations.set()
                return True
        except Exception as exc:  # the next renewal tells again
            log.warning("checking a lost lease failed", extra={"event": "run.lease_check_failed",
                                                               "run_id": str(run.run_id), "error": str(exc)[:200]})
            return False
        self._abandon(task, run, "lease_lost")
        return True

    async def _store_call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Store calls are idempotent: retry them while the database is away, up to one lease."""
        started = time.monotonic()  # the lease counts from the first attempt, not the first retry
        return await retried(call, lambda: AsyncRetrying(
            retry=retry_if_exception_type(StoreUnavailable),
            stop=stop_after_delay(max(0.0, self.settings.worker_lease_seconds - (time.monotonic() - started))),
            wait=wait_random_exponential(multiplier=0.2, max=5), reraise=True))

    async def _complete(self, run: ClaimedRun, request: ModelRequest, prediction: Prediction,
                        knowledge_error: str | None = None) -> None:
        input_tokens = prediction.input_tokens
        output_tokens = prediction.output_tokens
        reply = parse_reply(prediction.text)
        metadata: dict[str, Any] = {"route": request.route, "prediction_id": prediction.id,
                                    "history_used": request.history_used}
        if request.knowledge:
            metadata["knowledge"] = [{"chunk_id": c.id, "document_id": c.document_id, "source": c.source,
                                      "similarity": round(c.similarity, 4)} for c in request.knowledge]
        if knowledge_error:
            metadata["knowledge_error"] = knowledge_error
        if input_tokens is None or output_tokens is None:
            metadata["tokens_estimated"] = True
            input_tokens = request.prompt_tokens_estimate if input_tokens is None else input_tokens
            output_tokens = estimate_tokens(prediction.text) if output_tokens is None else output_tokens
        if prediction.predict_time is not None:
            metadata["predict_time"] = prediction.predict_time
        cost = estimate_cost(request.model, input_tokens, output_tokens, prediction.predict_time)
        self.completing.add(run.run_id)
        try:
            reply_id = await self.completions.submit(Completion(
                run, content=reply.content, model=request.model.slug, prediction_id=prediction.id,
                input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost,
                latency_ms=prediction.latency_ms, metadata=metadata,
                follow_ups=reply.follow_ups if request.follow_ups_offered else [],
                actions=reply.actions if request.actions_offered else [],
                time_to_first_token_ms=prediction.time_to_first_token_ms))
        finally:
            self.completing.discard(run.run_id)
        if cost is not None:  # paid for either way
            self.metrics.cost.labels(request.model.slug).inc(float(cost))
        if reply_id is None:
            # The run ended without this reply: cancelled by its user meanwhile (complete_runs
            # ended it so and counted what the prediction consumed), ended by a claim (failed,
            # its lease having run out), or answered by another attempt (20261123001900).
            self.counts["ended_meanwhile"] += 1
            log.info("run ended before its reply was written", extra={
                "event": "run.ended_meanwhile", "run_id": str(run.run_id), "prediction_id": prediction.id})
            return
        self.counts["completed"] += 1
        self.metrics.completed.labels(request.model.slug).inc()
        self.metrics.provider_latency.labels(request.model.slug).observe(prediction.latency_ms / 1000)
        if prediction.time_to_first_token_ms is not None:
            self.metrics.time_to_first_token.labels(request.model.slug).observe(prediction.time_to_first_token_ms / 1000)
        log.info("run completed", extra={"event": "run.completed", "run_id": str(run.run_id),
                                         "message_id": str(run.message_id), "attempt": run.attempt,
                                         "model": request.model.slug, "latency_ms": prediction.latency_ms,
                                         "output_tokens": output_tokens})

    async def _complete_batch(self, batch: list[Completion]) -> list[uuid.UUID | None | BaseException]:
        """Replies finished while the previous batch was being written go in one call
        (complete_runs); one alone, or a batch that failed as a whole, one call each
        (complete_run), so that each run gets its own outcome (e.g. RunGone)."""
        if len(batch) > 1:
            try:
                replies = await self._store_call(lambda: self.store.complete_many(batch))
                return [replies.get(c.run.run_id) for c in batch]
            except StoreUnavailable:
                raise
            except Exception as exc:
                log.info("batch completion failed; completing one by one",
                         extra={"event": "run.batch_failed", "size": len(batch), "error": str(exc)[:200]})
        outcomes: list[uuid.UUID | None | BaseException] = []
        for completion in batch:
            try:
                outcomes.append(await self._store_call(lambda c=completion: self.store.complete(c)))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _fail(self, run: ClaimedRun, request: ModelRequest | None, error: ProviderError,
                    handle: PredictionHandle | None = None) -> None:
        model = request.model.slug if request else "unknown"
        # A prediction that ran (and failed, hit the deadline or answered with an unusable output)
        # is paid for: recorded on the attempt's event and the cost metric, not the user's usage.
        consumed = None
        if handle is not None and handle.prediction_id:
            try:
                consumed = self._consumed(run, request, handle)
            except Exception as exc:  # the failure is recorded all the same, without what it consumed
                log.warning("pricing a failed attempt failed", extra={"event": "run.consumed_unknown",
                                                                      "run_id": str(run.run_id), "error": repr(exc)[:200]})
        retry_in = error.retry_after
        if retry_in is None:  # exponential backoff: base, 2 x base, 4 x base … up to the cap
            retry_in = min(self.settings.worker_retry_max_seconds,
                           self.settings.worker_retry_base_seconds * 2 ** (run.attempt - 1))
        status = await self._store_call(lambda: self.store.fail(
            run, code=error.code, error=error.message, retryable=error.retryable, retry_in=retry_in,
            model=model, prediction_id=error.prediction_id, latency_ms=None, consumed=consumed))
        self._paid(consumed)
        self._count_failed(error.code, run_ended=status == "failed")  # "failed": this attempt ended the run
        if status == "cancelled":  # its user cancelled it meanwhile: ended, not tried again
            self._count_cancelled()
        elif status == "superseded":  # the run went on without this attempt (its lease ran out, say)
            self.counts["superseded"] += 1
        log.warning("run attempt failed", extra={"event": "run.failed", "run_id": str(run.run_id),
                                                 "message_id": str(run.message_id), "attempt": run.attempt,
                                                 "error_code": error.code, "status": status, "model": model})
        if status == "queued":
            # Wake up when the retry falls due (the exact delay is the database's; this is a hint).
            asyncio.get_running_loop().call_later(retry_in + 0.05, self.wake)
