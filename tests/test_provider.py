"""The Replicate client at the HTTP level, through its real aiohttp session against a loopback
stub (tests/replicate_stub.py): the exact requests, every error class, retries and their limits,
output shapes, the event stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from multidict import CIMultiDict

from tests.replicate_stub import DROP, HANG, ReplicateStub, Reply
from worker.app import replicate_http
from worker.config import DEFAULT_CHAT_MODEL, DEFAULT_VISION_MODEL, Settings
from worker.prompts import build_request
from worker.provider import (
    Prediction,
    PredictionHandle,
    ProviderError,
    ReplicateClient,
    active_seconds,
    estimate_cost,
    parse_retry_after,
    server_sent_events,
)
from worker.simulator import ReplicateSimulator

CHAT_PATH = "/v1/models/meta/meta-llama-3-8b-instruct/predictions"


@pytest.fixture
async def stub() -> AsyncIterator[ReplicateStub]:
    async with ReplicateStub() as server:
        yield server


def settings(stub: ReplicateStub, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"replicate_api_token": "r8_test", "replicate_base_url": stub.base_url,
                              "replicate_max_retry_after_seconds": 2, "replicate_max_http_retries": 3}
    values.update(overrides)
    return Settings(**values)


def prediction(status: str = "succeeded", output: Any = None, base: str = "https://api.replicate.com",
               **extra: Any) -> dict[str, Any]:
    body = {"id": "p1", "model": "meta/meta-llama-3-8b-instruct", "version": "dp-1", "input": {}, "logs": "",
            "output": ["Navy", " goes", " with", " camel."] if output is None else output,
            "data_removed": False, "error": None, "status": status, "created_at": "2026-11-22T10:00:00.000Z",
            "urls": {"get": f"{base}/v1/predictions/p1", "cancel": f"{base}/v1/predictions/p1/cancel",
                     "stream": f"{base}/v1/streams/p1"}}
    if status == "succeeded":
        body["metrics"] = {"predict_time": 0.8, "input_token_count": 40, "output_token_count": 4}
    body.update(extra)
    return body


async def predict(s: Settings, model=DEFAULT_CHAT_MODEL, model_input: dict | None = None, *, on_text=None,
                  slept: list[float] | None = None):
    async with replicate_http(s) as http:
        client = ReplicateClient(http, s)
        if slept is not None:  # record the waits instead of waiting
            async def sleep(seconds: float) -> None:
                slept.append(seconds)
            client.sleep = sleep
        return await client.predict(model, model_input or {"prompt": "hi"}, on_text=on_text)


async def test_chat_request_is_exactly_what_replicate_documents(stub: ReplicateStub) -> None:
    route = stub.post(CHAT_PATH).respond(201, json=prediction())
    s = settings(stub)
    request = build_request(s, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                            "What goes with navy?", None)
    result = await predict(s, request.model, request.input)
    sent = route.calls[-1]
    assert sent.headers["Authorization"] == "Bearer r8_test"
    assert sent.headers["Prefer"] == "wait=60"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.json() == {"input": {
        "prompt": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful, concise assistant.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nWhat goes with navy?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "prompt_template": "{prompt}", "max_tokens": 512, "temperature": 0.6}}
    assert result.text == "Navy goes with camel." and result.id == "p1"
    assert (result.input_tokens, result.output_tokens, result.predict_time) == (40, 4, 0.8)


async def test_vision_runs_the_configured_version_with_image_and_prompt(stub: ReplicateStub) -> None:
    route = stub.post("/v1/predictions").respond(201, json=prediction(output=["A ", "red ", "scarf."]))
    s = settings(stub)
    request = build_request(s, [], "What is this?", "https://images.example/scarf.jpg")
    assert request.route == "vision"
    result = await predict(s, request.model, request.input)
    assert route.calls[-1].json() == {"version": DEFAULT_VISION_MODEL.version, "input": {
        "image": "https://images.example/scarf.jpg",
        "prompt": "You are a helpful, concise assistant.\n\nWhat is this?", "max_tokens": 512, "temperature": 0.6}}
    assert result.text == "A red scarf."


async def test_plain_string_output_is_accepted(stub: ReplicateStub) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction(output="Just one string."))
    assert (await predict(settings(stub))).text == "Just one string."


async def test_polls_until_the_prediction_ends(stub: ReplicateStub) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction("starting", output=[]))
    poll = stub.get("/v1/predictions/p1").side_effect(
        Reply(200, json=prediction("processing", output=["Na"])), Reply(200, json=prediction()))
    result = await predict(settings(stub))
    assert poll.call_count == 2 and result.text == "Navy goes with camel."
    assert poll.calls[0].headers["Authorization"] == "Bearer r8_test"


@pytest.mark.parametrize(("status", "body", "code", "retryable"), [
    (401, {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401},
     "unauthorized", False),
    (402, {"title": "Insufficient credit", "detail": "You have insufficient credit to run this model.", "status": 402},
     "billing_required", False),
    (404, {"detail": "The requested resource could not be found.", "status": 404}, "model_not_found", False),
    (422, {"title": "Input validation failed", "detail": "- input: prompt is required\n", "status": 422},
     "invalid_input", False),
])
async def test_client_errors_are_final(stub: ReplicateStub, status: int, body: dict, code: str, retryable: bool) -> None:
    route = stub.post(CHAT_PATH).respond(status, json=body)
    with pytest.raises(ProviderError) as error:
        await predict(settings(stub))
    assert (error.value.code, error.value.retryable, route.call_count) == (code, retryable, 1)
    assert body["detail"].split("\n")[0] in error.value.message


async def test_429_with_retry_after_is_retried_after_that_long(stub: ReplicateStub) -> None:
    slept: list[float] = []
    route = stub.post(CHAT_PATH).side_effect(
        Reply(429, headers={"Retry-After": "1.5"}, json={"detail": "Request was throttled.", "status": 429}),
        Reply(429, json={"detail": "Request was throttled. Your rate limit resets in ~2s.", "status": 429}),
        Reply(201, json=prediction()),
    )
    assert (await predict(settings(stub), slept=slept)).text == "Navy goes with camel."
    assert route.call_count == 3 and slept[:2] == [1.5, 2.0]


async def test_429_longer_than_the_cap_goes_back_to_the_run_with_its_delay(stub: ReplicateStub) -> None:
    route = stub.post(CHAT_PATH).respond(
        429, json={"detail": "Request was throttled. Your rate limit resets in ~30s.", "status": 429})
    with pytest.raises(ProviderError) as error:
        await predict(settings(stub))
    assert (error.value.code, error.value.retry_after, route.call_count) == ("rate_limited", 30.0, 1)


@pytest.mark.parametrize("failure", [
    Reply(500, json={"title": "Internal Server Error", "detail": "boom", "status": 500}),
    Reply(503, text="upstream unavailable"),
])
async def test_server_errors_are_retried_then_reported(stub: ReplicateStub, failure: Any) -> None:
    route = stub.post(CHAT_PATH).always(failure)
    slept: list[float] = []
    with pytest.raises(ProviderError) as error:
        await predict(settings(stub, replicate_max_http_retries=3), slept=slept)
    assert route.call_count == 4 and len(slept) == 3
    assert error.value.code == "provider_unavailable" and error.value.retryable


async def test_a_create_whose_connection_breaks_is_not_repeated(stub: ReplicateStub) -> None:
    # The request reached Replicate and no answer came back: it may have created a prediction,
    # so the HTTP layer does not create another; the run's own retry decides.
    route = stub.post(CHAT_PATH).always(DROP)
    with pytest.raises(ProviderError) as error:
        await predict(settings(stub, replicate_max_http_retries=3), slept=[])
    assert (error.value.code, error.value.retryable, route.call_count) == ("provider_unavailable", True, 1)
    assert "broke" in error.value.message


async def test_a_create_whose_connection_times_out_sent_nothing_and_is_retried(stub: ReplicateStub,
                                                                               monkeypatch) -> None:
    # No connection in time (or no free one in the pool): the request never left, so it is
    # retried like a refused connection, with no search for a prediction it cannot have started.
    route = stub.post(CHAT_PATH).respond(201, json=prediction())
    s = settings(stub)
    async with replicate_http(s) as http:
        real, calls = http.request, []

        def request(*args: Any, **kwargs: Any) -> Any:
            calls.append(args)
            if len(calls) == 1:
                raise aiohttp.ConnectionTimeoutError("Connection timeout to host")
            return real(*args, **kwargs)

        monkeypatch.setattr(http, "request", request)
        client = ReplicateClient(http, s)

        async def sleep(_: float) -> None:
            pass
        client.sleep = sleep
        assert (await client.predict(DEFAULT_CHAT_MODEL, {"prompt": "hi"})).text == "Navy goes with camel."
    assert route.call_count == 1 and len(calls) == 2 and not stub.unmatched


async def test_a_poll_whose_connection_breaks_is_repeated(stub: ReplicateStub) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction("processing", output=[]))
    poll = stub.get("/v1/predictions/p1").side_effect(DROP, Reply(200, json=prediction()))
    assert (await predict(settings(stub), slept=[])).text == "Navy goes with camel."
    assert poll.call_count == 2


async def test_an_unreachable_replicate_is_unavailable_and_retried() -> None:
    async with ReplicateStub() as closed:
        s = settings(closed, replicate_max_http_retries=2)
    slept: list[float] = []  # the server is gone: its port refuses connections
    with pytest.raises(ProviderError) as error:
        await predict(s, slept=slept)
    assert error.value.code == "provider_unavailable" and error.value.retryable and len(slept) == 2


async def test_a_read_waits_as_long_as_replicate_asks(stub: ReplicateStub) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction("processing", output=[]))
    poll = stub.get("/v1/predictions/p1").side_effect(
        Reply(429, headers={"Retry-After": "1.5"}, json={"detail": "Request was throttled.", "status": 429}),
        Reply(200, json=prediction()))
    slept: list[float] = []
    assert (await predict(settings(stub), slept=slept)).text == "Navy goes with camel."
    assert poll.call_count == 2 and slept == [0.1, 1.5]  # the first poll's delay, then Retry-After


async def test_a_prediction_replicate_no_longer_knows_fails_the_attempt_for_a_retry(stub: ReplicateStub) -> None:
    # A 404 on reading the prediction this worker created is not "model not found" (final for the
    # run): the attempt fails, retryable, and the run makes a new prediction.
    stub.post(CHAT_PATH).respond(201, json=prediction("processing", output=[]))
    poll = stub.get("/v1/predictions/p1").always(
        Reply(404, json={"detail": "The requested resource could not be found.", "status": 404}))
    cancel = stub.post("/v1/predictions/p1/cancel").respond(200, json=prediction("canceled", output=[]))
    with pytest.raises(ProviderError) as error:
        await predict(settings(stub, replicate_max_http_retries=1), slept=[])
    assert (error.value.code, error.value.retryable, error.value.prediction_id) == ("prediction_not_found", True, "p1")
    assert poll.call_count == 2  # read once more within the HTTP retries, then given up (not until the deadline)
    assert cancel.call_count == 0  # nothing to cancel that Replicate knows of


async def test_a_cancel_that_fails_for_a_moment_is_retried(stub: ReplicateStub) -> None:
    cancel = stub.post("/v1/predictions/p1/cancel").side_effect(
        Reply(503, text="upstream unavailable"),
        Reply(429, headers={"Retry-After": "0.5"}, json={"detail": "Request was throttled.", "status": 429}),
        Reply(200, json=prediction("canceled", output=[])))
    s = settings(stub)
    slept: list[float] = []
    async with replicate_http(s) as http:
        client = ReplicateClient(http, s)

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
        client.sleep = sleep
        ended = await client.cancel("p1")
    assert ended["status"] == "canceled" and cancel.call_count == 3
    assert len(slept) == 2 and slept[1] == 0.5


async def test_a_cancel_that_never_answers_is_given_up_in_bounded_time(stub: ReplicateStub, monkeypatch) -> None:
    # The cancel of a run or at shutdown waits for it: its retries together are bounded.
    import worker.provider

    monkeypatch.setattr(worker.provider, "CANCEL_WITHIN_SECONDS", 0.3)
    stub.post("/v1/predictions/p1/cancel").always(HANG)
    s = settings(stub)  # a read timeout of 30 s: without the bound the cancel would wait that long, at least
    async with replicate_http(s) as http:
        assert await asyncio.wait_for(ReplicateClient(http, s).cancel("p1"), timeout=10) == {}


async def test_a_server_error_then_success(stub: ReplicateStub) -> None:
    stub.post(CHAT_PATH).side_effect(Reply(502, text="bad gateway"), Reply(201, json=prediction()))
    assert (await predict(settings(stub), slept=[])).text == "Navy goes with camel."


async def test_a_read_timeout_on_create_is_not_repeated(stub: ReplicateStub) -> None:
    route = stub.post(CHAT_PATH).always(HANG)
    listed = stub.get("/v1/predictions").respond(200, json={"next": None, "previous": None, "results": []})
    with pytest.raises(ProviderError) as error:
        await predict(settings(stub, replicate_prefer_wait_seconds=1, replicate_timeout_seconds=0.2))
    assert (error.value.code, error.value.retryable, route.call_count) == ("timeout", True, 1)
    assert listed.call_count == 1  # it looked for a prediction the lost create might have started


@contextlib.asynccontextmanager
async def searching_client(s: Settings) -> AsyncIterator[tuple[ReplicateClient, list[str]]]:
    """A client on `s`, with how each of its searches for a lost create's prediction ended."""
    outcomes: list[str] = []
    async with replicate_http(s) as http:
        client = ReplicateClient(http, s)
        client.on_lost_create = outcomes.append
        yield client, outcomes


def listed(*predictions: dict[str, Any], next_url: str | None = None) -> dict[str, Any]:
    return {"next": next_url, "previous": None, "results": list(predictions)}


def iso(seconds_ago: float) -> str:
    return datetime.fromtimestamp(time.time() - seconds_ago, timezone.utc).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize("lost", [HANG, DROP, Reply(201, text="<html>bad gateway</html>")],
                         ids=["timeout", "connection_broken", "garbled_201"])
async def test_a_create_whose_answer_is_lost_uses_the_prediction_it_started(stub: ReplicateStub, lost: Any) -> None:
    # The create reached Replicate and its answer was lost: the prediction it started is found in
    # the account's list (page 2 here, past predictions of other inputs and models and a failed
    # one of the same input) and used, so the run's retry does not pay for a second one.
    mine = {"prompt": "hi", "max_tokens": 512}
    create = stub.post(CHAT_PATH).always(lost)
    first_page = listed(prediction(id="other-input", input={"prompt": "ho", "max_tokens": 512}, created_at=iso(0.1)),
                        prediction(id="other-model", model="meta/meta-llama-3-70b-instruct", input=mine,
                                   created_at=iso(0.1)),
                        prediction("failed", id="failed-one", input=mine, created_at=iso(0.2)),
                        next_url=f"{stub.base_url}/v1/predictions?cursor=c2")
    second_page = listed(prediction("processing", output=[], id="mine", input=mine, created_at=iso(0.3)),
                         prediction(id="too-old", input=mine, created_at=iso(3600)))
    pages = stub.get("/v1/predictions").side_effect(Reply(200, json=first_page), Reply(200, json=second_page))
    stub.get("/v1/predictions/mine").respond(200, json=prediction(id="mine", input=mine))
    result = await predict(settings(stub, replicate_prefer_wait_seconds=1, replicate_timeout_seconds=0.3), model_input=mine,
                           slept=[])
    assert (result.id, result.text) == ("mine", "Navy goes with camel.")
    assert create.call_count == 1
    assert [c.query for c in pages.calls] == ["", "cursor=c2"]
    assert all(c.headers["Authorization"] == "Bearer r8_test" for c in pages.calls)


@pytest.mark.parametrize("case", ["nothing_matches", "list_refused", "foreign_next", "only_old_ones"])
async def test_a_lost_create_whose_prediction_is_not_found_fails_for_the_runs_retry(stub: ReplicateStub,
                                                                                   case: str) -> None:
    mine = {"prompt": "hi"}
    stub.post(CHAT_PATH).always(HANG)
    pages = stub.get("/v1/predictions")
    if case == "nothing_matches":
        pages.respond(200, json=listed(prediction(id="x", input={"prompt": "hello"}, created_at=iso(0.1))))
    elif case == "list_refused":
        pages.respond(500, json={"title": "Server error", "detail": "boom", "status": 500})
    elif case == "foreign_next":  # the next page elsewhere is not asked for: the request carries the token
        pages.respond(200, json=listed(next_url="https://elsewhere.example/v1/predictions?cursor=2"))
    else:  # newest first: once a page reaches before the request, the search ends
        pages.respond(200, json=listed(prediction(id="old", input=mine, created_at=iso(3600)),
                                       next_url=f"{stub.base_url}/v1/predictions?cursor=2"))
    s = settings(stub, replicate_prefer_wait_seconds=1, replicate_timeout_seconds=0.2)
    async with searching_client(s) as (client, outcomes):
        with pytest.raises(ProviderError) as error:
            await client.predict(DEFAULT_CHAT_MODEL, mine)
    assert error.value.code == "timeout" and error.value.retryable
    assert pages.call_count == 1 and not stub.unmatched
    assert outcomes == ["unreadable" if case == "list_refused" else "not_found"]


async def test_a_lost_create_takes_no_prediction_it_cannot_tell_from_another(stub: ReplicateStub) -> None:
    # Two predictions of the same model and input made while the request was out (another run's,
    # say, with the same first message): either could be the one, so neither is taken; and one
    # made well after the request failed is not the request's.
    mine = {"prompt": "hi"}
    stub.post(CHAT_PATH).always(DROP)
    pages = stub.get("/v1/predictions").side_effect(
        Reply(200, json=listed(prediction("processing", output=[], id="a", input=mine, created_at=iso(0.1)),
                               prediction("processing", output=[], id="b", input=mine, created_at=iso(0.2)))),
        Reply(200, json=listed(prediction("processing", output=[], id="later", input=mine, created_at=iso(-60)))))
    s = settings(stub)
    async with searching_client(s) as (client, outcomes):
        for _ in range(2):
            with pytest.raises(ProviderError) as error:
                await client.predict(DEFAULT_CHAT_MODEL, mine)
            assert error.value.code == "provider_unavailable"
    assert outcomes == ["ambiguous", "not_found"] and pages.call_count == 2


async def test_a_lost_create_takes_nothing_while_a_twin_create_is_on_its_way(stub: ReplicateStub) -> None:
    # Another create of this worker with the same body is still waiting for its answer: the
    # prediction in the list may be that one's, so the lost create does not take it.
    mine = {"prompt": "hi"}
    create = stub.post(CHAT_PATH).side_effect(HANG, DROP)
    stub.get("/v1/predictions").respond(200, json=listed(prediction("processing", output=[], id="twin", input=mine,
                                                                    created_at=iso(0.1))))
    s = settings(stub)
    async with searching_client(s) as (client, outcomes):
        waiting = asyncio.create_task(client.create(DEFAULT_CHAT_MODEL, mine))
        while create.call_count < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(ProviderError):
            await client.predict(DEFAULT_CHAT_MODEL, mine)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    assert outcomes == ["ambiguous"]


async def test_a_lost_create_never_takes_a_prediction_this_client_already_has(stub: ReplicateStub) -> None:
    # Two runs of this worker with the same input: the first one's prediction is not the second's.
    mine = {"prompt": "hi"}
    stub.post(CHAT_PATH).side_effect(Reply(201, json=prediction(id="first", input=mine)), HANG)
    stub.get("/v1/predictions").respond(200, json=listed(prediction(id="first", input=mine, created_at=iso(0.1))))
    s = settings(stub, replicate_prefer_wait_seconds=1, replicate_timeout_seconds=0.2)
    async with replicate_http(s) as http:
        client = ReplicateClient(http, s)
        assert (await client.predict(DEFAULT_CHAT_MODEL, mine)).id == "first"
        with pytest.raises(ProviderError) as error:
            await client.predict(DEFAULT_CHAT_MODEL, mine)
    assert error.value.code == "timeout"


async def test_a_caller_cancelled_while_a_create_waits_to_be_retried_creates_nothing(stub: ReplicateStub) -> None:
    """Between retries no request is on its way: the create is dropped with its caller (nothing
    to settle), and the retry is never sent."""
    route = stub.post(CHAT_PATH).side_effect(Reply(503, text="busy"), Reply(201, json=prediction("processing", output=[])))
    s = settings(stub)
    waiting, dropped = asyncio.Event(), asyncio.Event()

    async def sleep(_: float) -> None:
        waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            dropped.set()
            raise

    async with replicate_http(s) as http:
        client = ReplicateClient(http, s)
        client.sleep = sleep
        handle = PredictionHandle()
        caller = asyncio.create_task(client.predict(DEFAULT_CHAT_MODEL, {"prompt": "hi"}, handle=handle))
        await asyncio.wait_for(waiting.wait(), 5)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.wait_for(dropped.wait(), 5)  # the retry's wait was cancelled with the caller
        assert handle.settling is None and client.settling == set()
    assert route.call_count == 1


async def test_a_prediction_past_its_deadline_is_cancelled(stub: ReplicateStub) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction("processing", output=[]))
    stub.get("/v1/predictions/p1").respond(200, json=prediction("processing", output=[]))
    cancel = stub.post("/v1/predictions/p1/cancel").respond(200, json=prediction("canceled", output=[]))
    with pytest.raises(ProviderError) as error:
        await predict(settings(stub, prediction_timeout_seconds=0.3))
    assert error.value.code == "timeout" and error.value.prediction_id == "p1" and cancel.call_count == 1


@pytest.mark.parametrize(("body", "code"), [
    (prediction("failed", output=None, error="CUDA out of memory"), "model_failed"),
    (prediction("canceled", output=None), "model_failed"),
    (prediction(output={"not": "text"}), "invalid_output"),
    (prediction(output=[1, 2, 3]), "invalid_output"),
    (prediction(output=["  "]), "invalid_output"),
    ({"detail": "no id here"}, "invalid_output"),
])
async def test_unusable_predictions(stub: ReplicateStub, body: dict, code: str) -> None:
    stub.post(CHAT_PATH).respond(201, json=body)
    with pytest.raises(ProviderError) as error:
        await predict(settings(stub, replicate_max_http_retries=0))
    assert error.value.code == code and error.value.retryable


async def test_non_json_answer_is_invalid_output(stub: ReplicateStub) -> None:
    stub.post(CHAT_PATH).respond(201, text="<html>oops</html>")
    with pytest.raises(ProviderError) as error:
        await predict(settings(stub, replicate_max_http_retries=0))
    assert error.value.code == "invalid_output"


async def test_a_redirect_is_not_followed(stub: ReplicateStub) -> None:
    stub.post(CHAT_PATH).respond(307, headers={"Location": "/v1/predictions"}, json={"detail": "moved"})
    elsewhere = stub.post("/v1/predictions").respond(201, json=prediction())
    with pytest.raises(ProviderError) as error:
        await predict(settings(stub, replicate_max_http_retries=0))
    assert error.value.code == "invalid_output" and not elsewhere.called


async def test_no_token_is_unauthorized_without_a_request(stub: ReplicateStub) -> None:
    route = stub.post(CHAT_PATH).respond(201, json=prediction())
    with pytest.raises(ProviderError) as error:
        await predict(Settings(_env_file=None, replicate_base_url=stub.base_url))
    assert error.value.code == "unauthorized" and not route.called and not stub.unmatched


# -- the event stream ----------------------------------------------------------------------------
def event_stream(*events: tuple[str, str]) -> str:
    return "".join(f"event: {name}\n" + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"
                   for name, data in events)


def sse(text: str, status: int = 200) -> Reply:
    return Reply(status, text=text, headers={"Content-Type": "text/event-stream"})


async def test_a_streamed_prediction_reports_its_text_as_it_grows(stub: ReplicateStub) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction("starting", output=[], base=stub.base_url))
    stream = stub.get("/v1/streams/p1").always(sse(": a comment first\n\n" + event_stream(
        ("output", "Navy"), ("output", " goes\nwith"), ("output", " camel."), ("done", "{}"))))
    final = stub.get("/v1/predictions/p1").respond(200, json=prediction(output=["Navy", " goes\nwith", " camel."]))
    seen: list[str] = []

    async def on_text(text: str) -> None:
        seen.append(text)

    result = await predict(settings(stub), on_text=on_text)
    assert seen == ["Navy", "Navy goes\nwith", "Navy goes\nwith camel."]
    assert result.text == "Navy goes\nwith camel." and result.time_to_first_token_ms is not None
    create, get = stub.routes[0].calls[0], stream.calls[0]
    assert "Prefer" not in create.headers  # streamed: the create answers at once
    assert get.headers["Accept"] == "text/event-stream" and get.headers["Authorization"] == "Bearer r8_test"
    assert final.call_count == 1  # the final prediction (metrics, output) is read once it ended


@pytest.mark.parametrize("broken", [
    sse(event_stream(("output", "Navy"), ("error", '{"detail": "boom"}'))),  # an error event
    sse(event_stream(("output", "Navy"))),                                    # ends without `done`
    Reply(200, json={"not": "a stream"}),                                   # not an event stream
    Reply(500, text="no"),                                                 # refused
    DROP,                                                                  # cut
])
async def test_a_broken_stream_falls_back_to_polling(stub: ReplicateStub, broken: Any) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction("processing", output=[], base=stub.base_url))
    stub.get("/v1/streams/p1").always(broken)
    poll = stub.get("/v1/predictions/p1").side_effect(
        Reply(200, json=prediction("processing", output=["Na"])), Reply(200, json=prediction()))
    assert (await predict(settings(stub), on_text=lambda _: asyncio.sleep(0), slept=[])).text == "Navy goes with camel."
    assert poll.call_count == 2


STANDARD_STREAM = (b"\xef\xbb\xbfretry: 1000\r\n: comment\r\nevent: output\r\ndata:no space\r\ndata:  two spaces\r\n\r\n"
                   b"data: default type\n\n"
                   b"event: ignored without data\n\n"
                   b"event: output\rdata: CR endings, \xc3\xa9t\xc3\xa9\r\r"
                   b"event: done\nid: 7\nunknown: field\ndata\n\n"
                   b"event: output\ndata: no blank line at the end\n")
STANDARD_EVENTS = [("output", "no space\n two spaces"), ("message", "default type"), ("output", "CR endings, été"),
                   ("done", "")]


async def events_of(*chunks: bytes) -> list[tuple[str, str]]:
    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [event async for event in server_sent_events(stream())]


async def test_server_sent_events_are_read_as_the_standard_says() -> None:
    # The byte order mark is dropped, lines end at CRLF, LF or CR, and the last event, cut off by
    # the end of the stream, is discarded.
    assert await events_of(STANDARD_STREAM) == STANDARD_EVENTS
    assert await events_of(b"data: a line ended by a CR at the very end\r\r") == \
        [("message", "a line ended by a CR at the very end")]


async def test_an_event_ended_by_a_cr_is_given_before_the_next_chunk_arrives() -> None:
    """A CR at the end of a chunk ends the line at once: a server that ends lines with CR alone
    does not have its tokens held back (an LF that follows in the next chunk is dropped)."""
    async def stream() -> AsyncIterator[bytes]:
        yield b"data: token\r\r"
        raise AssertionError("the event waited for the next chunk")

    async with contextlib.aclosing(server_sent_events(stream())) as events:
        assert await anext(events) == ("message", "token")
    assert await events_of(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [("message", "a\nb")]


@examples(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(STANDARD_STREAM)), max_size=12))
def test_server_sent_events_do_not_depend_on_how_the_stream_is_cut(cuts: list[int]) -> None:
    """However the bytes arrive (a CRLF or a UTF-8 character split between two chunks, a
    byte at a time), the events are the same."""
    bounds = [0, *sorted(cuts), len(STANDARD_STREAM)]
    chunks = [STANDARD_STREAM[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert asyncio.run(events_of(*chunks)) == STANDARD_EVENTS


@pytest.mark.parametrize("stream", [
    [b"data: " + b"x" * 100_000] * 3,                          # a line that does not end
    [b"data: " + b"x" * 100_000 + b"\n"] * 3 + [b"\n"],        # an event that does not end
])
async def test_an_event_stream_without_bounds_is_given_up(stream: list[bytes]) -> None:
    with pytest.raises(ValueError, match="longer than"):
        await events_of(*stream)


def test_cost_per_token_and_per_second() -> None:
    # llama-3-8b: $0.05 / 1M input tokens, $0.25 / 1M output tokens
    assert estimate_cost(DEFAULT_CHAT_MODEL, 1000, 2000, 1.0) == Decimal("0.000550")
    # llava-13b: $0.000725 per second of predict_time
    assert estimate_cost(DEFAULT_VISION_MODEL, None, None, 2.5) == Decimal("0.001813")
    assert estimate_cost(DEFAULT_VISION_MODEL, None, None, None) is None


async def test_creates_are_spread_under_replicates_rate_limit(stub: ReplicateStub) -> None:
    route = stub.post(CHAT_PATH).always(lambda _: Reply(201, json=prediction()))
    s = settings(stub, replicate_max_creates_per_minute=120)  # a bucket of 2 a second
    async with replicate_http(s) as http:
        client = ReplicateClient(http, s)
        await asyncio.gather(*(client.predict(DEFAULT_CHAT_MODEL, {"prompt": "hi"}) for _ in range(4)))
    # The bucket lets two through at once; the next two wait for it to drain (0.5 s each).
    sent_at = sorted(call.at for call in route.calls)
    assert sent_at[3] - sent_at[0] >= 0.9


@pytest.mark.parametrize(("header", "expected"), [
    ("2", 2.0), ("0.5", 0.5), ("-3", 0.0), (":", None), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ("99999999", 3600.0),
])
def test_retry_after_is_read_defensively(header: str, expected: float | None) -> None:
    assert parse_retry_after(CIMultiDict({"Retry-After": header}), "") == expected


async def test_reads_that_keep_failing_are_read_again_apart_and_warned_of_once(stub: ReplicateStub, caplog) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction("processing", output=[]))
    stub.get("/v1/predictions/p1").side_effect(
        Reply(503, json={"detail": "down"}), Reply(429, json={"detail": "slow down"}, headers={"Retry-After": "7"}),
        Reply(500, json={"detail": "down"}), Reply(200, json=prediction()))
    slept: list[float] = []
    with caplog.at_level("DEBUG", logger="worker.provider"):
        result = await predict(settings(stub, replicate_max_http_retries=0), slept=slept)
    assert result.text == "Navy goes with camel."
    # After each failed read the next waits at least 2 s, or what Retry-After asked (7 s, once).
    assert slept[1:] == [2.0, 7.0, 2.0], slept
    warnings = [r for r in caplog.records if r.getMessage().startswith("reading the prediction failed")]
    assert [r.levelname for r in warnings] == ["WARNING", "DEBUG", "DEBUG"]


async def test_a_read_that_hangs_ends_at_the_predictions_deadline(stub: ReplicateStub) -> None:
    # The HTTP timeout is an hour: only the prediction's own deadline can end the read.
    stub.post(CHAT_PATH).respond(201, json=prediction("processing", output=[]))
    stub.get("/v1/predictions/p1").always(HANG)
    cancel = stub.post("/v1/predictions/p1/cancel").respond(200, json=prediction("canceled", output=[]))
    s = settings(stub, replicate_timeout_seconds=3600, prediction_timeout_seconds=0.5, replicate_max_http_retries=0)
    with pytest.raises(ProviderError) as failure:
        await asyncio.wait_for(predict(s), 60)  # a bound for the test only: a hang fails it instead of CI
    assert failure.value.code == "timeout" and cancel.call_count == 1


@pytest.mark.parametrize(("prediction", "seconds"), [
    ({"started_at": "2024-05-01T10:00:00.25Z", "completed_at": "2024-05-01T10:00:03.75Z"}, 3.5),
    ({"started_at": "2024-05-01T10:00:03Z", "completed_at": "2024-05-01T10:00:01Z"}, 0.0),  # clock skew: none
    ({"completed_at": "2024-05-01T10:00:03Z"}, None),  # canceled while starting: it never ran
    ({"started_at": "2024-05-01T10:00:00Z", "completed_at": None}, None),
    ({"started_at": "yesterday", "completed_at": "2024-05-01T10:00:03Z"}, None),
    ({"started_at": "2024-05-01T10:00:00", "completed_at": "2024-05-01T10:00:03Z"}, None),  # naive against aware
])
def test_the_seconds_a_prediction_ran_come_from_its_timestamps(prediction: dict, seconds: float | None) -> None:
    assert active_seconds(prediction) == seconds


async def test_a_prediction_that_ended_by_its_deadline_is_not_thrown_away(stub: ReplicateStub) -> None:
    # It succeeded between the last read and the deadline: the cancel answers it succeeded.
    stub.post(CHAT_PATH).respond(201, json=prediction("processing", output=[]))
    stub.get("/v1/predictions/p1").always(Reply(200, json=prediction("processing", output=[])))
    cancel = stub.post("/v1/predictions/p1/cancel").respond(200, json=prediction())
    result = await predict(settings(stub, prediction_timeout_seconds=0.3))
    assert result.text == "Navy goes with camel." and result.input_tokens == 40 and cancel.call_count == 1


@pytest.mark.parametrize("urls", [["https://x"], "https://x", 5, None])
async def test_urls_that_are_no_object_fall_back_to_polling(stub: ReplicateStub, urls: Any) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction("processing", output=[], urls=urls))
    poll = stub.get("/v1/predictions/p1").side_effect(Reply(200, json=prediction()))
    result = await predict(settings(stub), on_text=lambda _: asyncio.sleep(0), slept=[])
    assert result.text == "Navy goes with camel." and poll.call_count == 1


async def test_an_unforeseen_error_after_the_create_cancels_the_prediction(stub: ReplicateStub, monkeypatch) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction("processing", output=[]))
    cancel = stub.post("/v1/predictions/p1/cancel").respond(200, json=prediction("canceled", output=[]))

    async def broken(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ReplicateClient, "_stream", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        await predict(settings(stub), on_text=lambda _: asyncio.sleep(0), slept=[])
    assert cancel.call_count == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -50, 3_000_000_000, True, "40", None])
def test_metrics_that_cannot_be_counts_count_as_absent(value: Any) -> None:
    reported = Prediction("p1", "", {"input_token_count": value, "output_token_count": value, "predict_time": value,
                                     "time_to_first_token": value})
    assert (reported.input_tokens, reported.output_tokens, reported.predict_time) == (None, None, None)
    assert Prediction("p1", "", {"input_token_count": 40.0, "predict_time": 0.5}).input_tokens == 40


async def test_a_reply_with_nul_characters_is_written_without_them(stub: ReplicateStub) -> None:
    stub.post(CHAT_PATH).respond(201, json=prediction(output=["Na\u0000vy", "\u0000"]))
    assert (await predict(settings(stub))).text == "Navy"


async def test_an_lf_chunk_ending_a_crlf_leaves_the_blank_line_after_it() -> None:
    assert await events_of(b"event: output\r\ndata: a\r", b"\n", b"\nevent: output\r\ndata: b\r\n\n") == [
        ("output", "a"), ("output", "b")]


async def test_an_empty_chunk_between_the_cr_and_the_lf_of_a_crlf_changes_nothing() -> None:
    assert await events_of(b"event: output\r", b"", b"\ndata: a\r\n\r\n") == [("output", "a")]


async def test_the_simulator_lists_predictions_as_replicate_documents() -> None:
    # GET /v1/predictions: newest first, a page at a time, `next` and `previous` as URLs to follow,
    # each prediction with its input (what finding a lost create's prediction relies on).
    simulator = ReplicateSimulator(token="r8_test", list_page_size=2)
    await simulator.start()
    try:
        s = Settings(replicate_api_token="r8_test", replicate_base_url=simulator.base_url)
        async with replicate_http(s) as http:
            client = ReplicateClient(http, s)
            made = [(await client.predict(DEFAULT_CHAT_MODEL, {"prompt": f"n{i}"})).id for i in range(3)]
            auth = {"Authorization": "Bearer r8_test"}
            async with http.get(f"{simulator.base_url}/v1/predictions", headers=auth) as response:
                first = await response.json()
            async with http.get(first["next"], headers=auth) as response:
                second = await response.json()
    finally:
        await simulator.stop()
    assert [p["id"] for p in first["results"]] == made[:0:-1] and first["previous"] is None
    assert [p["id"] for p in second["results"]] == made[:1] and second["next"] is None
    assert second["previous"].startswith(simulator.base_url)
    assert [p["input"] for p in first["results"] + second["results"]] == [{"prompt": f"n{i}"} for i in (2, 1, 0)]
