"""Replicate's predictions API over aiohttp: create with `Prefer: wait`, or stream the prediction's
server-sent events; poll until the prediction ends, normalise output and map every failure to
an error code.

The aiohttp session is passed in (tests point it at loopback servers that speak Replicate's
API). aiohttp directly, not httpx: httpx's request building, cookie handling and stream layers
on top of aiohttp cost about as much CPU again as the requests themselves (bench/README.md,
"The worker's HTTP client"). Creating a
prediction is retried with tenacity on 429 (honouring `Retry-After` and the "resets in ~Ns"
of Replicate's throttle message), 5xx and connection errors; a wait longer than
`replicate_max_retry_after_seconds` is handed back to the run's own backoff instead of holding a
worker slot."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from worker import jsonload
from worker.config import ModelProfile, Settings
from worker.retries import retried

log = logging.getLogger("worker.provider")

TERMINAL = {"succeeded", "failed", "canceled", "aborted"}
PREDICTION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # it goes into URLs: nothing else is accepted
THROTTLE_RESET = re.compile(r"resets in ~?(\d+(?:\.\d+)?)\s*s")
CANCEL_WITHIN_SECONDS = 15.0  # a cancel and its retries together
# Finding the prediction of a create whose answer was lost (see `_find_created`): how many pages
# of the account's predictions (100 each, newest first) are read; how far either side of the
# request's time the search looks (Replicate's clock against ours); the least time a search is
# given (REPLICATE_TIMEOUT_SECONDS otherwise); how many searches run at once (a page can weigh
# megabytes: during an incident every lost create would search); how many ids of predictions
# this client created or found are remembered, so that it never takes one of them again.
RECOVERY_PAGES = 5
RECOVERY_CLOCK_MARGIN_SECONDS = 10.0
RECOVERY_MIN_SECONDS = 5.0
RECOVERY_CONCURRENCY = 2
KNOWN_PREDICTIONS = 4096


class ProviderError(Exception):
    """A failed prediction attempt, with the normalised code stored on events and runs."""

    def __init__(self, code: str, message: str, *, retryable: bool, retry_after: float | None = None,
                 prediction_id: str | None = None, status: int | None = None, request_sent: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.prediction_id = prediction_id
        self.status = status
        # The request went out and no answer came back: a create may have created a prediction.
        self.request_sent = request_sent


MAX_COUNT = 2**31 - 1  # the database's integer
MAX_SECONDS = 7 * 86400.0


def metric(value: Any, most: float) -> float | None:
    """A number Replicate reported, if it is one that can be: finite, not negative, at most
    `most` (JSON's NaN, Infinity, 1e400, a negative or huge count are no counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and 0 <= number <= most else None


@dataclass
class Prediction:
    id: str
    text: str
    metrics: dict[str, Any] = field(default_factory=dict)
    latency_ms: int = 0
    time_to_first_token_ms: int | None = None

    @property
    def input_tokens(self) -> int | None:
        value = metric(self.metrics.get("input_token_count"), MAX_COUNT)
        return None if value is None else int(value)

    @property
    def output_tokens(self) -> int | None:
        value = metric(self.metrics.get("output_token_count"), MAX_COUNT)
        return None if value is None else int(value)

    @property
    def predict_time(self) -> float | None:
        return metric(self.metrics.get("predict_time"), MAX_SECONDS)


@dataclass
class PredictionHandle:
    """What the caller can know about a prediction in flight: its id and the last state seen
    (after a cancellation: the canceled prediction, with what it consumed)."""

    prediction_id: str | None = None
    last: dict[str, Any] = field(default_factory=dict)
    time_to_first_token_ms: int | None = None
    read_failures: int = 0  # reads of the prediction that failed and were tried again
    streamed: str = ""  # the text streamed so far
    stream_heard_at: float = 0.0  # monotonic time of the stream's last event (or its start)
    # True while a create request is on its way to Replicate (sent, no answer yet), or the search
    # for the prediction of one whose answer was lost runs.
    create_in_flight: bool = False
    # Set when the caller was cancelled during that create: it ends in the background, then the
    # prediction it started is cancelled at Replicate (and `prediction_id`, `last` are filled in).
    settling: asyncio.Task[None] | None = None


OnText = Callable[[str], Awaitable[None]]


def estimate_cost(model: ModelProfile, input_tokens: int | None, output_tokens: int | None,
                  predict_time: float | None) -> Decimal | None:
    """Per token where the model is billed per token, else per second of predict_time."""
    price = model.price
    if price.usd_per_input_token is not None or price.usd_per_output_token is not None:
        if input_tokens is None and output_tokens is None:
            return None
        cost = (price.usd_per_input_token or 0) * (input_tokens or 0) + (price.usd_per_output_token or 0) * (output_tokens or 0)
    elif price.usd_per_second is not None and predict_time is not None:
        cost = price.usd_per_second * Decimal(str(predict_time))
    else:
        return None
    return Decimal(cost).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def _timestamp(value: Any) -> float | None:
    """An ISO 8601 time of Replicate's ("2026-11-22T10:00:00.123456Z") as epoch seconds."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def active_seconds(prediction: Mapping[str, Any]) -> float | None:
    """The seconds a prediction ran, from its `started_at` to its `completed_at`: what Replicate
    bills a per-second model for, where the prediction's metrics leave out `predict_time` (a
    canceled one may). None if either is missing or unreadable."""
    try:
        started = datetime.fromisoformat(str(prediction["started_at"]))
        ended = datetime.fromisoformat(str(prediction["completed_at"]))
        return min(max(0.0, (ended - started).total_seconds()), MAX_SECONDS)
    except (KeyError, TypeError, ValueError):
        return None


def parse_retry_after(headers: Mapping[str, str], detail: str) -> float | None:
    """Seconds to wait: the Retry-After header (seconds or an HTTP date), else the "resets in
    ~Ns" of Replicate's throttle message. Anything unreadable counts as absent. `headers` is
    case-insensitive (aiohttp's, or a multidict.CIMultiDict)."""
    header = headers.get("retry-after", "").strip()
    if header:
        try:
            return min(max(0.0, float(header)), 3600.0)
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            return min(max(0.0, when.timestamp() - time.time()), 3600.0)
    match = THROTTLE_RESET.search(detail or "")
    return min(float(match.group(1)), 3600.0) if match else None


@dataclass
class Answer:
    """An HTTP answer, read whole."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def _detail(body: bytes) -> str:
    try:
        value = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return str(value.get("detail") or value.get("title") or value)[:500]
    return str(value)[:500]


def error_from_response(answer: Answer) -> ProviderError:
    status, detail = answer.status, _detail(answer.body)
    message = f"Replicate answered {status}: {detail}"
    if status == 429:
        return ProviderError("rate_limited", message, retryable=True,
                             retry_after=parse_retry_after(answer.headers, detail), status=status)
    if status in (401, 403):
        return ProviderError("unauthorized", message, retryable=False, status=status)
    if status == 402:
        return ProviderError("billing_required", message, retryable=False, status=status)
    if status == 404:
        return ProviderError("model_not_found", message, retryable=False, status=status)
    if status in (400, 413, 422):
        return ProviderError("invalid_input", message, retryable=False, status=status)
    if status >= 500:
        return ProviderError("provider_unavailable", message, retryable=True,
                             retry_after=parse_retry_after(answer.headers, detail), status=status)
    return ProviderError("provider_error", message, retryable=False, status=status)


def output_text(output: Any) -> str:
    """Language models stream a list of tokens; some models return one string."""
    if isinstance(output, str):
        return output
    if isinstance(output, list) and all(isinstance(part, str) for part in output):
        return "".join(output)
    raise ProviderError("invalid_output", f"unexpected output type {type(output).__name__}", retryable=True)


MAX_EVENT_SIZE = 1 << 18  # bytes of a line, characters of an event's data: more is no token, the stream is given up


async def _line_blocks(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[str]]:
    """The lines that each chunk of an event stream completes (a chunk usually carries a whole
    event: no Python-level read per line). Lines end at CRLF, LF or CR; an LF that follows a CR
    ending the previous chunk is the rest of a CRLF. A leading byte order mark is dropped. Each
    chunk is searched once, so a long line arriving in small pieces costs linear time."""
    parts: list[bytes] = []  # an unfinished line
    held, after_cr, first = 0, False, True
    async for chunk in chunks:
        if not chunk:
            continue
        if after_cr:  # this chunk's first LF, if any, ends the CR that ended the last chunk
            after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    continue
        cut = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1
        if not cut:
            parts.append(chunk)
            held += len(chunk)
            if held > MAX_EVENT_SIZE:
                raise ValueError(f"an event stream line longer than {MAX_EVENT_SIZE} bytes")
            after_cr = False
            continue
        block = b"".join((*parts, chunk[:cut])).decode("utf-8", errors="replace")
        parts, held = [chunk[cut:]], len(chunk) - cut
        after_cr = cut == len(chunk) and chunk[-1] == 13  # 13: CR
        if first:
            block, first = block.removeprefix("\ufeff"), False
        yield block.replace("\r\n", "\n").replace("\r", "\n").split("\n")[:-1]


async def server_sent_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each event of a text/event-stream, read as the WHATWG HTML standard's
    "event stream interpretation" says: `field: value` lines, one leading space of the value
    dropped, `data` lines joined with newlines, `:` comments and unknown fields ignored, an event
    dispatched at a blank line when it has data, its type "message" unless an `event` line named
    it, an event cut off by the end of the stream discarded. `id` and `retry` are ignored: a
    broken stream is not resumed (the caller polls the prediction instead). The stream may come in
    chunks of any size; a line or an event over MAX_EVENT_SIZE raises ValueError."""
    event, data, size = "", [], 0
    async with contextlib.aclosing(_line_blocks(chunks)) as blocks:
        async for lines in blocks:
            for line in lines:
                if not line:
                    if data:
                        yield event or "message", "\n".join(data)
                    event, data, size = "", [], 0
                elif line[0] != ":":
                    name, _, value = line.partition(":")
                    if value[:1] == " ":
                        value = value[1:]
                    if name == "data":
                        data.append(value)
                        size += len(value) + 1
                        if size > MAX_EVENT_SIZE:
                            raise ValueError(f"an event stream event longer than {MAX_EVENT_SIZE} characters")
                    elif name == "event":
                        event = value


class ReplicateClient:
    def __init__(self, http: aiohttp.ClientSession, settings: Settings) -> None:
        self.http = http
        self.settings = settings
        self.base_url = settings.replicate_base_url.rstrip("/")
        per_minute = settings.replicate_max_creates_per_minute
        # A leaky bucket of 1/60 of the minute's allowance, so a burst is spread over the minute.
        self.create_limiter = AsyncLimiter(max(1, per_minute // 60), 1) if per_minute else None
        # How retries and polls wait (tests replace it to skip the waiting).
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        # Creates whose caller was cancelled while they were on their way: see `_settle`.
        self.settling: set[asyncio.Task[None]] = set()
        # The ids of the predictions this client created or found lately (insertion-ordered, bounded).
        self._known: dict[str, None] = {}
        # Told how each search for a lost create's prediction ended: found, not_found, ambiguous
        # or unreadable.
        self.on_lost_create: Callable[[str], None] | None = None
        self._searches = asyncio.Semaphore(RECOVERY_CONCURRENCY)
        # The body of each create on its way (or searching), by a token of its own: a search does
        # not take a prediction that another of this client's creates may have started.
        self._creating: dict[object, bytes] = {}
        timeout = settings.replicate_timeout_seconds
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        # A create held by Prefer: wait answers once the prediction ends: up to the wait, plus time.
        self._create_timeout = aiohttp.ClientTimeout(total=None, connect=timeout,
                                                     sock_read=settings.replicate_prefer_wait_seconds + timeout)
        # A stream lasts no longer than its prediction may. A total, not a read timeout: aiohttp
        # re-arms a read timeout at every chunk, a timer per token.
        self._stream_timeout = aiohttp.ClientTimeout(total=settings.prediction_timeout_seconds, connect=timeout)

    def _headers(self, token: str | None) -> dict[str, str]:
        token = token or (self.settings.replicate_api_token.get_secret_value()
                          if self.settings.replicate_api_token else None)
        if not token:
            raise ProviderError("unauthorized", "no Replicate API token configured", retryable=False)
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def _send(self, method: str, url: str, headers: dict[str, str], body: bytes | None,
                    timeout: aiohttp.ClientTimeout) -> Answer:
        try:
            async with self.http.request(method, url, headers=headers, data=body, timeout=timeout,
                                         allow_redirects=False) as response:
                return Answer(response.status, response.headers, await response.read())
        except aiohttp.ConnectionTimeoutError as exc:  # no connection in time: nothing was sent
            raise ProviderError("provider_unavailable", f"cannot reach Replicate in time ({type(exc).__name__})",
                                retryable=True) from exc
        except TimeoutError as exc:  # aiohttp's read timeouts are TimeoutErrors too
            raise ProviderError("timeout", f"Replicate did not answer in time ({type(exc).__name__})", retryable=True,
                                request_sent=True) from exc
        except aiohttp.ClientConnectorError as exc:  # no connection: nothing was sent
            raise ProviderError("provider_unavailable", f"cannot reach Replicate ({type(exc).__name__})", retryable=True) from exc
        except aiohttp.ClientError as exc:  # the connection broke once the request was on its way
            raise ProviderError("provider_unavailable", f"the connection to Replicate broke before it answered "
                                f"({type(exc).__name__})", retryable=True, request_sent=True) from exc

    async def _request(self, method: str, url: str, headers: dict[str, str], body: bytes | None = None,
                       timeout: aiohttp.ClientTimeout | None = None) -> dict[str, Any]:
        answer = await self._send(method, url, headers, body, timeout or self._timeout)
        if answer.status >= 400:
            raise error_from_response(answer)
        try:
            prediction = jsonload.loads(answer.body)
        except ValueError as exc:
            raise ProviderError("invalid_output", "Replicate answered with something that is not JSON", retryable=True) from exc
        if not isinstance(prediction, dict) or not isinstance(prediction.get("status"), str) \
                or not isinstance(prediction.get("id"), str) or not PREDICTION_ID.fullmatch(prediction["id"]):
            raise ProviderError("invalid_output", "Replicate answered without a valid prediction id and status",
                                retryable=True)
        return prediction

    async def create(self, model: ModelProfile, model_input: dict[str, Any], token: str | None = None,
                     wait: bool = True, handle: PredictionHandle | None = None) -> dict[str, Any]:
        """POST the prediction; with `wait`, wait up to `replicate_prefer_wait_seconds` for it to
        finish (Prefer: wait), else return at once (to stream it). A create whose answer was lost
        answers with the prediction it started if `_find_created` finds it. `handle.create_in_flight`
        is true while a request is on its way, or such a search runs."""
        flight = handle or PredictionHandle()
        headers = self._headers(token)
        if wait:
            headers["Prefer"] = f"wait={self.settings.replicate_prefer_wait_seconds}"
        if model.version:
            url, payload = f"{self.base_url}/v1/predictions", {"version": model.version, "input": model_input}
        else:
            url, payload = f"{self.base_url}/v1/models/{model.slug}/predictions", {"input": model_input}
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        timeout = self._create_timeout if wait else self._timeout

        def created_nothing(exc: ProviderError) -> bool:
            # Only answers that created nothing. A read timeout, a connection broken once the
            # request was sent or a garbled 201 may have created a prediction: it is looked for
            # below, and the run's own retry decides if it is not found.
            return exc.code in ("rate_limited", "provider_unavailable") and not exc.request_sent

        sent_at: float | None = None

        async def attempt() -> dict[str, Any]:
            nonlocal sent_at
            if self.create_limiter is not None:
                await self.create_limiter.acquire()
            flight.create_in_flight = True
            sent_at = time.time()  # the last attempt is the one that may have created something
            try:
                return await self._request("POST", url, headers, body, timeout)
            finally:
                flight.create_in_flight = False

        mine = object()
        self._creating[mine] = body
        try:
            prediction = await retried(attempt, self._retrying(created_nothing, multiplier=0.5, most=8))
        except ProviderError as exc:
            if sent_at is None or not (exc.request_sent or exc.code == "invalid_output"):
                raise  # an answer that created nothing
            # The request went out and its answer was lost (a timeout, a broken connection, a
            # garbled 201): the prediction it may have started is looked for, not made again.
            flight.create_in_flight = True  # a cancelled caller settles what is found
            try:
                # Bounded as a whole: shutdown waits for settling creates.
                async with asyncio.timeout(max(self.settings.replicate_timeout_seconds, RECOVERY_MIN_SECONDS)):
                    async with self._searches:
                        twin = any(other == body for key, other in self._creating.items() if key is not mine)
                        outcome, found = await self._find_created(model, payload["input"], headers,
                                                                  (sent_at, time.time()), twin)
            except TimeoutError:
                log.warning("looking for the prediction of a lost create took too long", extra={
                    "event": "prediction.recovery_failed", "error": "timeout"})
                outcome, found = "unreadable", None
            finally:
                flight.create_in_flight = False
            if self.on_lost_create is not None:
                self.on_lost_create(outcome)
            if found is None:
                raise
            log.warning("the answer to a create was lost; its prediction was found and is used", extra={
                "event": "prediction.recovered", "prediction_id": found["id"], "error_code": exc.code})
            prediction = found
        finally:
            del self._creating[mine]
        self._remember(prediction["id"])
        return prediction

    def _remember(self, prediction_id: str) -> None:
        self._known[prediction_id] = None
        if len(self._known) > KNOWN_PREDICTIONS:
            del self._known[next(iter(self._known))]

    async def _find_created(self, model: ModelProfile, model_input: dict[str, Any], headers: dict[str, str],
                            sent: tuple[float, float], twin: bool) -> tuple[str, dict[str, Any] | None]:
        """The prediction a create with a lost answer started, from the account's list of
        predictions (GET /v1/predictions: newest first, 100 a page, each with its input), then
        read afresh (the list's entries carry no stream URL): the one prediction of `model` with
        exactly this input, made through the API, not failed or canceled, not one this client
        knows already, and created while the request was out (`sent`: from when it went out to
        when it failed, each widened by RECOVERY_CLOCK_MARGIN_SECONDS for the clocks).

        Returns how the search ended, with the prediction when "found": "not_found" (none within
        RECOVERY_PAGES pages), "ambiguous" (more than one, or another of this client's creates
        with the same body is on its way: `twin`, and either could be the one; a prediction
        taken from another run would be cancelled or paid for twice) or "unreadable" (the list
        could not be read). The run's retry then creates anew."""
        since, until = sent[0] - RECOVERY_CLOCK_MARGIN_SECONDS, sent[1] + RECOVERY_CLOCK_MARGIN_SECONDS
        expected = json.loads(json.dumps(model_input, ensure_ascii=False, allow_nan=False))  # as Replicate echoes it
        url = f"{self.base_url}/v1/predictions"
        read_headers = {"Authorization": headers["Authorization"]}
        found: list[dict[str, Any]] = []
        for _ in range(RECOVERY_PAGES):
            try:
                answer = await self._send("GET", url, read_headers, None, self._timeout)
                if answer.status >= 400:
                    raise error_from_response(answer)
                page = jsonload.loads(answer.body)
                results = page["results"]
                if not isinstance(results, list):
                    raise TypeError("results is not a list")
            except (ProviderError, ValueError, TypeError, KeyError) as exc:
                log.warning("looking for the prediction of a lost create failed", extra={
                    "event": "prediction.recovery_failed", "error": repr(exc)[:200]})
                return "unreadable", None
            older = False
            for candidate in results:
                created = _timestamp(candidate.get("created_at")) if isinstance(candidate, dict) else None
                if created is None or created < since:
                    older = older or created is not None
                    continue
                prediction_id = candidate.get("id")
                if created <= until and candidate.get("model") == model.slug and candidate.get("input") == expected \
                        and candidate.get("source", "api") == "api" \
                        and candidate.get("status") in ("starting", "processing", "succeeded") \
                        and isinstance(prediction_id, str) and PREDICTION_ID.fullmatch(prediction_id) \
                        and prediction_id not in self._known:
                    found.append(candidate)
            following = page.get("next")
            # Newest first: a page that reached past `since` ends the search. The next page is
            # followed only on Replicate's own host (the request carries the token).
            if older or not isinstance(following, str) or not following.startswith(f"{self.base_url}/"):
                break
            url = following
        if not found:
            return "not_found", None
        if len(found) > 1 or twin:
            log.warning("a lost create's prediction cannot be told from another", extra={
                "event": "prediction.recovery_failed", "error": f"{len(found)} matching, twin={twin}"})
            return "ambiguous", None
        [prediction] = found
        try:  # afresh: its state now, and the stream URL the list leaves out
            fresh = await self._request("GET", f"{self.base_url}/v1/predictions/{prediction['id']}", read_headers)
        except ProviderError:
            fresh = {}
        return "found", fresh if fresh.get("id") == prediction["id"] else prediction

    def _retrying(self, transient: Callable[[ProviderError], bool], *, multiplier: float,
                  most: float) -> Callable[[], AsyncRetrying]:
        """HTTP retries of one request: `transient` errors, up to REPLICATE_MAX_HTTP_RETRIES, after
        what Replicate asked (Retry-After, or its throttle message) else a jittered backoff. An
        error asking for more than REPLICATE_MAX_RETRY_AFTER_SECONDS is handed to the caller,
        which waits at its own level (the run's retry, the next read)."""
        max_wait = self.settings.replicate_max_retry_after_seconds

        def retry(exc: BaseException) -> bool:
            return isinstance(exc, ProviderError) and transient(exc) \
                and (exc.retry_after is None or exc.retry_after <= max_wait)

        def wait(state: Any) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ProviderError) and exc.retry_after is not None:
                return exc.retry_after
            return wait_random_exponential(multiplier=multiplier, max=most)(state)

        return lambda: AsyncRetrying(stop=stop_after_attempt(self.settings.replicate_max_http_retries + 1),
                                     retry=retry_if_exception(retry), wait=wait, sleep=self.sleep, reraise=True)

    async def get(self, prediction_id: str, token: str | None = None) -> dict[str, Any]:
        """Reads a prediction. A 404 means Replicate does not know the prediction this worker
        created (not a missing model): `prediction_not_found`, which fails the attempt (the run
        retries with a new prediction) instead of ending the run as the create's 404 would."""
        url, headers = f"{self.base_url}/v1/predictions/{prediction_id}", self._headers(token)

        async def read() -> dict[str, Any]:
            try:
                return await self._request("GET", url, headers)
            except ProviderError as exc:
                if exc.status == 404:
                    raise ProviderError("prediction_not_found", f"Replicate does not know prediction {prediction_id}"
                                        f" ({exc})", retryable=True, status=404) from exc
                raise

        return await retried(read, self._retrying(lambda e: e.retryable, multiplier=0.2, most=5))

    async def cancel(self, prediction_id: str, token: str | None = None) -> dict[str, Any]:
        """Cancels at Replicate (retried like a read: cancelling twice is harmless); returns the
        prediction as it ended ({} if that failed)."""
        url = f"{self.base_url}/v1/predictions/{prediction_id}/cancel"
        try:
            # Bounded as a whole: a cancellation (of a run, at shutdown) waits for it.
            async with asyncio.timeout(CANCEL_WITHIN_SECONDS):
                return await retried(lambda: self._request("POST", url, self._headers(token)),
                                     self._retrying(lambda e: e.retryable, multiplier=0.2, most=2))
        except (ProviderError, TimeoutError) as exc:
            log.warning("cancelling a prediction failed", extra={
                "event": "prediction.cancel_failed", "prediction_id": prediction_id,
                "error_code": exc.code if isinstance(exc, ProviderError) else "timeout"})
            return {}  # best effort: the prediction may have ended meanwhile

    async def _stream(self, url: str, token: str | None, on_text: OnText, handle: PredictionHandle,
                      started: float) -> bool:
        """Reads the prediction's server-sent events (`output`, `error`, `done`), calling
        `on_text` with the text so far. True when the stream ended with `done`; False when it
        broke or reported an error (the caller then polls: the prediction decides)."""
        headers = {**self._headers(token), "Accept": "text/event-stream", "Cache-Control": "no-store"}
        handle.stream_heard_at = time.monotonic()
        idle = self.settings.stream_idle_poll_seconds

        async def watch() -> None:
            """While the stream is quiet, reads the prediction every `idle` seconds; returns when
            it has ended without its stream saying so (the caller then uses what was read). One
            task per stream; the reader only notes the time of each event."""
            while True:
                wait = handle.stream_heard_at + idle - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                try:
                    handle.last = await self.get(str(handle.prediction_id), token)
                except Exception as exc:  # the stream, or the reads after it, decide
                    log.debug("reading a quiet stream's prediction failed", extra={
                        "event": "stream.quiet_read_failed", "prediction_id": handle.prediction_id,
                        "error": repr(exc)[:200]})
                if handle.last.get("status") in TERMINAL:
                    log.warning("prediction ended while its stream was quiet; reading it instead",
                                extra={"event": "stream.quiet", "prediction_id": handle.prediction_id})
                    return
                handle.stream_heard_at = time.monotonic()

        try:
            async with self.http.get(url, headers=headers, timeout=self._stream_timeout, allow_redirects=False) as response:
                if response.status != 200 or response.content_type != "text/event-stream":
                    log.warning("prediction stream refused; polling instead",
                                extra={"event": "stream.broken", "prediction_id": handle.prediction_id,
                                       "error": f"HTTP {response.status} {response.content_type}"})
                    return False
                reader = asyncio.create_task(self._read_events(response, on_text, handle, started))
                watchdog = asyncio.create_task(watch(), name="stream-watchdog")
                try:
                    await asyncio.wait((reader, watchdog), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (reader, watchdog):
                        task.cancel()
                    await asyncio.gather(reader, watchdog, return_exceptions=True)
                if not reader.cancelled():
                    return reader.result()  # the stream's own end (or its exception, below)
                return False  # the prediction ended while the stream was quiet
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: an event over MAX_EVENT_SIZE
            log.warning("prediction stream broke; polling instead",
                        extra={"event": "stream.broken", "prediction_id": handle.prediction_id,
                               "error": type(exc).__name__})
        return False

    async def _read_events(self, response: aiohttp.ClientResponse, on_text: OnText, handle: PredictionHandle,
                           started: float) -> bool:
        text = ""
        async with contextlib.aclosing(server_sent_events(response.content.iter_any())) as events:
            async for event, data in events:
                handle.stream_heard_at = time.monotonic()
                if event == "output":
                    if handle.time_to_first_token_ms is None:
                        handle.time_to_first_token_ms = int((handle.stream_heard_at - started) * 1000)
                    text += data
                    handle.streamed = text
                    await on_text(text)
                elif event == "error":
                    log.warning("prediction stream reported an error",
                                extra={"event": "stream.error", "prediction_id": handle.prediction_id})
                    return False
                elif event == "done":
                    return True
        return False

    async def _read_again(self, handle: PredictionHandle, token: str | None, deadline: float, delay: float) -> float:
        """Reads the prediction into `handle.last`; returns the delay before the next read. A
        read that failed in a way worth trying again (5xx, 429, a timeout, a garbled body), past
        its HTTP retries, leaves the last state known, and the caller reads again until the
        prediction's deadline: the prediction runs on at Replicate, and failing the attempt would
        pay for a second one. The read itself ends at the deadline; the next one waits at least
        what Replicate asked (Retry-After) or 2 s."""
        prediction_id = str(handle.prediction_id)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                handle.last = await self.get(prediction_id, token)
                return delay
        except TimeoutError:
            code, retry_after = "timeout", None
        except ProviderError as exc:
            if not exc.retryable or exc.code == "prediction_not_found":  # reading again would not find it
                raise
            code, retry_after = exc.code, exc.retry_after
        # Once per prediction at warning level: an outage at Replicate would otherwise log every read.
        log.log(logging.DEBUG if handle.read_failures else logging.WARNING, "reading the prediction failed; reading it again",
                extra={"event": "prediction.read_failed", "prediction_id": prediction_id, "error_code": code})
        handle.read_failures += 1
        return max(delay, retry_after if retry_after is not None else 2.0)

    async def run(self, model: ModelProfile, model_input: dict[str, Any], token: str | None = None, *,
                  on_text: OnText | None = None, handle: PredictionHandle | None = None) -> tuple[dict[str, Any], int]:
        """Run one prediction until it succeeds: the final prediction object and the latency in
        ms. Raises ProviderError with a normalised code (a failed or canceled prediction too).
        With `on_text`, the prediction is streamed (SSE from `urls.stream`) and `on_text` gets the
        text so far; the final output is still the prediction's own, read once it has ended."""
        handle = handle or PredictionHandle()
        started = time.monotonic()
        create = asyncio.ensure_future(self.create(model, model_input, token, wait=on_text is None, handle=handle))
        try:
            # Shielded: a caller cancelled while the request is on its way must not drop it, or
            # the prediction it starts runs on at Replicate, unknown and paid for.
            prediction = await asyncio.shield(create)
        except asyncio.CancelledError:
            if handle.create_in_flight or create.done():
                handle.settling = self._settle(create, token, handle)
            else:  # waiting for the rate limiter or a retry: nothing was created
                create.cancel()
            raise
        prediction_id = handle.prediction_id = prediction["id"]
        handle.last = prediction
        deadline = started + self.settings.prediction_timeout_seconds
        delay = 0.1
        try:
            urls = prediction.get("urls")
            stream_url = urls.get("stream") if on_text and isinstance(urls, dict) else None
            if isinstance(stream_url, str) and stream_url.startswith(("https://", "http://")) \
                    and prediction["status"] not in TERMINAL:
                if await self._stream(stream_url, token, on_text, handle, started):  # type: ignore[arg-type]
                    delay = await self._read_again(handle, token, deadline, delay)
                    prediction = handle.last
                elif handle.last.get("status") in TERMINAL:  # read by the stream's watchdog
                    prediction = handle.last
            while prediction["status"] not in TERMINAL:
                if time.monotonic() >= deadline:
                    handle.last = await self.cancel(prediction_id, token) or handle.last
                    if handle.last.get("status") == "succeeded":  # it ended meanwhile: not thrown away
                        prediction = handle.last
                        break
                    raise ProviderError("timeout", f"prediction did not finish in {self.settings.prediction_timeout_seconds:g}s",
                                        retryable=True)
                await self.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 1.5, 2.0)
                delay = await self._read_again(handle, token, deadline, delay)
                prediction = handle.last
        except asyncio.CancelledError:
            handle.last = await asyncio.shield(self.cancel(prediction_id, token)) or handle.last
            raise
        except ProviderError as exc:
            exc.prediction_id = exc.prediction_id or prediction_id
            if exc.code not in ("timeout", "prediction_not_found") and handle.last.get("status") not in TERMINAL:
                # best effort: the attempt gives the prediction up, so nobody pays for it
                handle.last = await asyncio.shield(self.cancel(prediction_id, token)) or handle.last
            raise
        except Exception:  # a bug, or an answer no code foresaw: the attempt fails, the prediction must not run on
            if handle.last.get("status") not in TERMINAL:
                with contextlib.suppress(Exception):
                    handle.last = await asyncio.shield(self.cancel(prediction_id, token)) or handle.last
            raise
        status = prediction["status"]
        if status != "succeeded":
            error = str(prediction.get("error") or f"prediction {status}")[:500]
            raise ProviderError("model_failed", f"prediction {status}: {error}", retryable=True,
                                prediction_id=prediction_id)
        return prediction, int((time.monotonic() - started) * 1000)

    def _settle(self, create: asyncio.Future[dict[str, Any]], token: str | None,
                handle: PredictionHandle) -> asyncio.Task[None]:
        """Lets a create whose caller was cancelled answer, then cancels the prediction it
        started (a held create may even answer with the prediction ended: it is then only
        recorded in `handle`). A create whose answer was lost answers with the prediction it
        started if `_find_created` finds it; one it does not find may run on at Replicate, the
        gap the README names."""
        async def settle() -> None:
            try:
                prediction = await create
            except (Exception, asyncio.CancelledError):  # a ProviderError, or the session closed
                return
            handle.prediction_id, handle.last = prediction["id"], prediction
            if prediction["status"] not in TERMINAL:
                try:
                    handle.last = await self.cancel(prediction["id"], token) or prediction
                except Exception as exc:  # cancel() answers {} for Replicate's errors; this is the session's
                    log.warning("cancelling a settled prediction failed", extra={
                        "event": "prediction.cancel_failed", "prediction_id": prediction["id"], "error": repr(exc)[:200]})
                    return
            log.info("the create of a cancelled prediction answered; cancelled it at Replicate",
                     extra={"event": "prediction.settled", "prediction_id": prediction["id"],
                            "status": handle.last.get("status")})

        task = asyncio.create_task(settle(), name="settle-create")
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)
        return task

    async def predict(self, model: ModelProfile, model_input: dict[str, Any], token: str | None = None, *,
                      on_text: OnText | None = None, handle: PredictionHandle | None = None) -> Prediction:
        """Run a language model's prediction to its end: its text, metrics and latency."""
        handle = handle or PredictionHandle()
        prediction, latency_ms = await self.run(model, model_input, token, on_text=on_text, handle=handle)
        prediction_id = prediction["id"]
        try:
            text = output_text(prediction.get("output"))
        except ProviderError as exc:
            exc.prediction_id = prediction_id
            raise
        text = text.replace("\x00", "")  # PostgreSQL text cannot hold NUL (a byte-fallback token can be one)
        if not text.strip():
            raise ProviderError("invalid_output", "the model returned an empty reply", retryable=True,
                                prediction_id=prediction_id)
        metrics = prediction.get("metrics") if isinstance(prediction.get("metrics"), dict) else {}
        first_token = handle.time_to_first_token_ms
        reported = metric(metrics.get("time_to_first_token"), MAX_SECONDS)
        if first_token is None and reported is not None:
            first_token = int(reported * 1000)
        return Prediction(prediction_id, text, metrics, latency_ms, first_token)
