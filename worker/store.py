"""The worker's SQL API (supabase/migrations/*_worker_functions.sql) over either transport.

`RunStore` holds the calls; a transport only knows how to call a function with named arguments:
`PostgresStore` over a psycopg pool, `PostgrestStore` through PostgREST RPC with supabase-py."""

from __future__ import annotations

import math
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from worker import jsonload


class StoreUnavailable(Exception):
    """The database (or PostgREST in front of it) could not be reached; worth retrying."""


class RunGone(Exception):
    """The run no longer exists: its message or thread was deleted while it was worked on."""


@dataclass(frozen=True)
class ClaimedRun:
    run_id: uuid.UUID
    message_id: uuid.UUID
    thread_id: uuid.UUID
    user_id: uuid.UUID
    attempt: int
    max_attempts: int
    content: str
    image_url: str | None
    history: list[dict[str, Any]]  # emptied by the worker once the prompt is built (Worker._process)
    plan_id: str = "free"
    uses_own_key: bool = False
    assistant: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    # refused at admission: finished by the database already; or "replies_in_flight": put back
    # in the queue to wait for the user's replies in flight
    blocked_code: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ClaimedRun:
        return cls(
            run_id=uuid.UUID(str(row["run_id"])), message_id=uuid.UUID(str(row["message_id"])),
            thread_id=uuid.UUID(str(row["thread_id"])), user_id=uuid.UUID(str(row["user_id"])),
            attempt=int(row["attempt"]), max_attempts=int(row["max_attempts"]), content=row["content"] or "",
            image_url=row["image_url"], history=list(row["history"] or []),
            plan_id=row.get("plan_id") or "free", uses_own_key=bool(row.get("uses_own_key")),
            assistant=row.get("assistant"), profile=row.get("profile"), blocked_code=row.get("blocked_code"),
        )


def storable(value: Any) -> Any:
    """What PostgreSQL can store of text the worker did not write itself (a model's reply, its
    follow-ups and proposed actions, a provider's error message): text and jsonb refuse NUL
    characters, UTF-8 has no lone surrogates (a JSON string may escape one), and jsonb has no NaN
    or Infinity. NULs are dropped, lone surrogates become U+FFFD, non-finite numbers null; in
    dicts and lists too, keys included. Without this one such character made every attempt's
    reply unwritable: each attempt failed after its prediction ran, and none was charged."""
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # pairs escaped apart join; lone halves are replaced
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class Completion:
    """A finished reply, as complete_run takes it."""

    run: ClaimedRun
    content: str
    model: str
    prediction_id: str | None
    input_tokens: int | None
    output_tokens: int | None
    cost_usd: Decimal | None
    latency_ms: int | None
    metadata: dict[str, Any]
    follow_ups: list[str] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    time_to_first_token_ms: int | None = None

    def arguments(self) -> dict[str, Any]:
        """complete_run's arguments without their p_ prefix."""
        return {"run_id": self.run.run_id, "attempt": self.run.attempt, "content": storable(self.content),
                "model": self.model, "provider": "replicate", "prediction_id": self.prediction_id,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "cost_usd": self.cost_usd,
                "latency_ms": self.latency_ms, "metadata": storable(self.metadata),
                "follow_ups": storable(self.follow_ups), "actions": storable(self.actions),
                "time_to_first_token_ms": self.time_to_first_token_ms}

    def json(self) -> dict[str, Any]:
        """The same as one element of complete_runs' JSON array (exact decimal as a string)."""
        return {k: str(v) if isinstance(v, (uuid.UUID, Decimal)) else v for k, v in self.arguments().items()}


@dataclass(frozen=True)
class QueueStatus:
    due_now: int
    next_due_at: datetime | None
    in_progress: int


class RunStore(ABC):
    @abstractmethod
    async def call(self, function: str, args: dict[str, Any], *, rows: bool = False) -> Any:
        """Call `public.<function>` with named arguments: a list of row dicts when `rows`,
        else the single value it returns."""

    async def close(self) -> None:  # noqa: B027 - optional for transports
        pass

    async def claim(self, worker: str, limit: int, lease_seconds: int, *, chat_model: str | None = None,
                    vision_model: str | None = None) -> list[ClaimedRun]:
        """Claims due runs. Runs refused by their user's plan end as blocked in the database and
        come back marked with their code (the models name where they would have gone, for their
        events); runs put back to wait for their user's replies in flight come back marked
        `replies_in_flight`."""
        found = await self.call("claim_runs", {"p_worker": worker, "p_limit": limit, "p_lease_seconds": lease_seconds,
                                               "p_chat_model": chat_model, "p_vision_model": vision_model}, rows=True)
        return [ClaimedRun.from_row(row) for row in found]

    async def complete(self, completion: Completion) -> uuid.UUID | None:
        """The reply id; None when the run was cancelled meanwhile (no reply is written then)."""
        reply = await self.call("complete_run", {f"p_{k}": v for k, v in completion.arguments().items()})
        return uuid.UUID(str(reply)) if reply else None

    async def complete_many(self, completions: list[Completion]) -> dict[uuid.UUID, uuid.UUID | None]:
        """Several completions in one call and one transaction (complete_runs): each run's reply
        id. Any error fails them all and changes nothing (then complete them one by one)."""
        rows = await self.call("complete_runs", {"p_runs": [c.json() for c in completions]}, rows=True)
        return {uuid.UUID(str(r["run_id"])): uuid.UUID(str(r["reply_id"])) if r["reply_id"] else None for r in rows}

    async def fail(self, run: ClaimedRun, *, code: str, error: str, retryable: bool, retry_in: float | None,
                   model: str, prediction_id: str | None, latency_ms: int | None,
                   consumed: dict[str, Any] | None = None) -> str:
        """'queued' (to be tried again), 'failed' (this attempt ended the run), 'cancelled' (its
        user cancelled it meanwhile: ended so) or 'superseded' (the run went on without this
        attempt: taken over, completed, cancelled or ended).
        `consumed`: what the attempt's prediction consumed (input_tokens, output_tokens,
        cost_usd), recorded on its event (see the migration 20261123000600)."""
        return str(await self.call("fail_attempt", {
            "p_run_id": run.run_id, "p_attempt": run.attempt, "p_error_code": code, "p_error": storable(error),
            "p_retryable": retryable, "p_retry_in_seconds": retry_in, "p_model": model, "p_provider": "replicate",
            "p_prediction_id": prediction_id, "p_latency_ms": latency_ms, "p_consumed": consumed,
        }))

    async def finish_cancelled(self, run: ClaimedRun, consumed: dict[str, Any] | None) -> bool:
        """Ends a cancelled run with what it consumed; false if the run no longer exists (its
        message or thread was deleted)."""
        return bool(await self.call("finish_cancelled", {"p_run_id": run.run_id, "p_consumed": consumed}))

    async def record_orphaned_consumption(self, run: ClaimedRun, consumed: dict[str, Any]) -> bool:
        """What the prediction of a run deleted meanwhile consumed, charged to its user once;
        false when it was recorded already (see the migration 20261123000800)."""
        return bool(await self.call("record_orphaned_consumption", {
            "p_run_id": run.run_id, "p_user_id": run.user_id, "p_consumed": {**consumed, "thread_id": str(run.thread_id)}}))

    async def record_cancelled_consumption(self, run: ClaimedRun, consumed: dict[str, Any]) -> bool:
        """What a prediction consumed whose create answered after its run was cancelled; false
        when the run's cancelled event already says (see the migration 20261123000400)."""
        return bool(await self.call("record_cancelled_consumption", {"p_run_id": run.run_id, "p_consumed": consumed}))

    async def record_abandoned_attempt(self, run: ClaimedRun, consumed: dict[str, Any]) -> bool:
        """An attempt abandoned because its lease was lost, with what its prediction consumed
        (not charged to the user); false when the attempt has an event already or the run is
        gone (see the migration 20261123001200)."""
        return bool(await self.call("record_abandoned_attempt", {"p_run_id": run.run_id, "p_consumed": consumed}))

    async def cancelled_runs(self, run_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        rows = await self.call("cancelled_runs", {"p_run_ids": [str(r) for r in run_ids]}, rows=True)
        return {uuid.UUID(str(row["run_id"])) for row in rows}

    async def release(self, run: ClaimedRun, worker: str) -> bool:
        return bool(await self.call("release_run", {"p_run_id": run.run_id, "p_worker": worker, "p_attempt": run.attempt}))

    async def extend_lease(self, run: ClaimedRun, worker: str, lease_seconds: int) -> bool:
        return bool(await self.call("extend_lease", {"p_run_id": run.run_id, "p_worker": worker,
                                                     "p_attempt": run.attempt, "p_lease_seconds": lease_seconds}))

    async def replicate_token(self, user_id: uuid.UUID) -> dict[str, Any] | None:
        """A BYOK user's stored token (see get_replicate_token in the migrations)."""
        return await self.call("get_replicate_token", {"p_user_id": user_id})

    async def pending_replicate_tokens(self) -> list[dict[str, Any]]:
        return await self.call("pending_replicate_tokens", {"p_limit": 100}, rows=True)

    async def store_encrypted_replicate_token(self, user_id: uuid.UUID, version: int, ciphertext: str) -> bool:
        return bool(await self.call("store_encrypted_replicate_token",
                                    {"p_user_id": user_id, "p_version": version, "p_ciphertext": ciphertext}))

    async def refresh_usage_reports(self) -> None:
        await self.call("refresh_ai_usage_reports", {})

    async def prune_usage_windows(self, limit: int = 10000) -> int:
        """Deletes up to `limit` usage windows past their retention; how many it deleted."""
        return int(await self.call("prune_usage_windows", {"p_limit": limit}))

    async def queue_status(self) -> QueueStatus:
        [row] = await self.call("run_queue_status", {}, rows=True)
        next_due = row["next_due_at"]
        if isinstance(next_due, str):
            next_due = datetime.fromisoformat(next_due)
        return QueueStatus(int(row["due_now"]), next_due, int(row["in_progress"]))


# Calls whose time grows with the data, not with one request: the materialized usage reports are
# refreshed every USAGE_REPORT_REFRESH_SECONDS, and at scale that may take longer than the
# statement timeout meant for the worker's own calls.
UNTIMED_CALLS = frozenset({"refresh_ai_usage_reports"})


class PostgresStore(RunStore):
    """Direct connection: `select * from fn(p_x => %(p_x)s, …)` over a psycopg pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    @classmethod
    async def connect(cls, url: str, max_size: int = 10, open_timeout: float = 30.0,
                      statement_timeout: float = 30.0) -> PostgresStore:
        # A short checkout timeout: while the database is away, calls fail fast (StoreUnavailable)
        # and the worker's own backoff takes over, instead of each call hanging for 30 s.
        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            await cls._configure(conn)
            # A call stuck on a lock or an overloaded server ends (QueryCanceled, retried as
            # unavailable) instead of holding a run's slot and a connection without end. Set on
            # the session: a startup option would be refused by some poolers.
            if statement_timeout:
                await conn.execute(f"set statement_timeout = {int(statement_timeout * 1000)}")

        pool = AsyncConnectionPool(url, min_size=1, max_size=max_size, open=False, timeout=5,
                                   kwargs={"autocommit": True, "row_factory": dict_row}, configure=configure)
        try:
            await pool.open(wait=True, timeout=open_timeout)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
        set_json_loads(jsonload.loads, conn)  # json and jsonb results: histories, profiles, assistants

    async def close(self) -> None:
        await self.pool.close()

    async def call(self, function: str, args: dict[str, Any], *, rows: bool = False) -> Any:
        params = {k: Jsonb(v) if isinstance(v, (dict, list)) else v for k, v in args.items()}
        named = ", ".join(f"{k} => %({k})s" for k in params)
        sql = f"select * from public.{function}({named})" if rows else f"select public.{function}({named}) as value"
        try:
            async with self.pool.connection() as conn:
                if function in UNTIMED_CALLS:  # one transaction, without the session's statement timeout
                    async with conn.transaction():
                        await conn.execute("set local statement_timeout = 0")
                        found = await (await conn.execute(sql, params)).fetchall()
                else:
                    try:
                        cursor = await conn.execute(sql, params)
                    except psycopg.errors.FeatureNotSupported as exc:
                        if exc.diag.source_function != "RevalidateCachedQuery":  # whatever lc_messages says
                            raise
                        # A migration changed the function's result type since this connection
                        # prepared the call (psycopg prepares repeated statements). Nothing ran: drop
                        # the connection's prepared statements (psycopg forgets its own on DEALLOCATE
                        # ALL) and call again, instead of failing on this connection until it is closed.
                        await conn.execute("deallocate all")
                        cursor = await conn.execute(sql, params)
                    found = await cursor.fetchall()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            # connection lost, server restarting, or the statement timeout (QueryCanceled is an
            # OperationalError): nothing was written
            raise StoreUnavailable(str(exc)) from exc
        except psycopg.errors.NoDataFound as exc:  # P0002 from the functions: no such run
            raise RunGone(str(exc)) from exc
        return found if rows else found[0]["value"]


def transient(code: str) -> bool:
    """A PostgREST error worth retrying: it could not reach or keep its database (PGRST000-003),
    a gateway in front of it failed (the HTTP status is the code when the body is not PostgREST's),
    or PostgreSQL refused for now, as PostgresStore's OperationalError does: connection (08), out
    of resources or connections (53), shutdown (57P), serialization failure or deadlock (40001,
    40P01: the transaction was rolled back, nothing was written) or a statement timeout (57014,
    PostgREST's role has one too). SQLSTATEs are five characters: the HTTP statuses 400-409 of a
    non-PostgREST body are not class 40."""
    if code.startswith("PGRST00") or code in ("502", "503", "504"):
        return True
    return len(code) == 5 and (code[:2] in ("08", "53") or code.startswith("57P")
                               or code in ("40001", "40P01", "57014"))


class PostgrestStore(RunStore):
    """Supabase: `POST /rest/v1/rpc/<fn>` with the service role key, through supabase-py."""

    def __init__(self, client: Any) -> None:
        self.client = client  # supabase.AsyncClient

    @staticmethod
    def _json(value: Any) -> Any:
        if isinstance(value, uuid.UUID):
            return str(value)
        if isinstance(value, Decimal):
            return float(value)
        return value

    async def call(self, function: str, args: dict[str, Any], *, rows: bool = False) -> Any:
        import httpx
        from postgrest.exceptions import APIError

        try:
            response = await self.client.rpc(function, {k: self._json(v) for k, v in args.items()}).execute()
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"PostgREST unreachable: {exc}") from exc
        except APIError as exc:
            if exc.code == "P0002":
                raise RunGone(exc.message or "run not found") from exc
            if transient(str(exc.code or "")):
                raise StoreUnavailable(f"PostgREST: {exc.message}") from exc
            raise
        return response.data
