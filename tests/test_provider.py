"""The Replicate client at the HTTP level (respx): the exact requests, every error class, retries
and their limits, output shapes."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import httpx
import pytest
import respx

from worker.config import DEFAULT_CHAT_MODEL, DEFAULT_VISION_MODEL, Settings
from worker.prompts import build_request
from worker.provider import ProviderError, ReplicateClient, estimate_cost

BASE = "https://api.replicate.test"
CHAT_URL = f"{BASE}/v1/models/meta/meta-llama-3-8b-instruct/predictions"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"replicate_api_token": "r8_test", "replicate_base_url": BASE,
                              "replicate_max_retry_after_seconds": 2, "replicate_max_http_retries": 3}
    values.update(overrides)
    return Settings(**values)


def prediction(status: str = "succeeded", output: Any = None, **extra: Any) -> dict[str, Any]:
    body = {"id": "p1", "model": "meta/meta-llama-3-8b-instruct", "version": "dp-1", "input": {}, "logs": "",
            "output": ["Navy", " goes", " with", " camel."] if output is None else output,
            "data_removed": False, "error": None, "status": status, "created_at": "2026-11-22T10:00:00.000Z",
            "urls": {"get": f"{BASE}/v1/predictions/p1", "cancel": f"{BASE}/v1/predictions/p1/cancel",
                     "stream": f"{BASE}/v1/streams/p1"}}
    if status == "succeeded":
        body["metrics"] = {"predict_time": 0.8, "input_token_count": 40, "output_token_count": 4}
    body.update(extra)
    return body


async def predict(s: Settings, model=DEFAULT_CHAT_MODEL, model_input: dict | None = None):
    async with httpx.AsyncClient() as http:
        return await ReplicateClient(http, s).predict(model, model_input or {"prompt": "hi"})


@respx.mock
async def test_chat_request_is_exactly_what_replicate_documents() -> None:
    route = respx.post(CHAT_URL).mock(return_value=httpx.Response(201, json=prediction()))
    s = settings()
    request = build_request(s, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                            "What goes with navy?", None)
    result = await predict(s, request.model, request.input)
    sent = route.calls.last.request
    assert sent.headers["Authorization"] == "Bearer r8_test"
    assert sent.headers["Prefer"] == "wait=60"
    body = httpx.Response(200, content=sent.content).json()
    assert body == {"input": {
        "prompt": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful, concise assistant.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nWhat goes with navy?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "prompt_template": "{prompt}", "max_tokens": 512, "temperature": 0.6}}
    assert result.text == "Navy goes with camel." and result.id == "p1"
    assert (result.input_tokens, result.output_tokens, result.predict_time) == (40, 4, 0.8)


@respx.mock
async def test_vision_runs_the_configured_version_with_image_and_prompt() -> None:
    route = respx.post(f"{BASE}/v1/predictions").mock(
        return_value=httpx.Response(201, json=prediction(output=["A ", "red ", "scarf."])))
    s = settings()
    request = build_request(s, [], "What is this?", "https://images.example/scarf.jpg")
    assert request.route == "vision"
    result = await predict(s, request.model, request.input)
    body = httpx.Response(200, content=route.calls.last.request.content).json()
    assert body == {"version": DEFAULT_VISION_MODEL.version, "input": {
        "image": "https://images.example/scarf.jpg",
        "prompt": "You are a helpful, concise assistant.\n\nWhat is this?", "max_tokens": 512, "temperature": 0.6}}
    assert result.text == "A red scarf."


@respx.mock
async def test_plain_string_output_is_accepted() -> None:
    respx.post(CHAT_URL).mock(return_value=httpx.Response(201, json=prediction(output="Just one string.")))
    assert (await predict(settings())).text == "Just one string."


@respx.mock
async def test_polls_until_the_prediction_ends() -> None:
    respx.post(CHAT_URL).mock(return_value=httpx.Response(201, json=prediction("starting", output=[])))
    poll = respx.get(f"{BASE}/v1/predictions/p1").mock(side_effect=[
        httpx.Response(200, json=prediction("processing", output=["Na"])),
        httpx.Response(200, json=prediction()),
    ])
    result = await predict(settings())
    assert poll.call_count == 2 and result.text == "Navy goes with camel."


@pytest.mark.parametrize(("status", "body", "code", "retryable"), [
    (401, {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token", "status": 401},
     "unauthorized", False),
    (402, {"title": "Insufficient credit", "detail": "You have insufficient credit to run this model.", "status": 402},
     "billing_required", False),
    (404, {"detail": "The requested resource could not be found.", "status": 404}, "model_not_found", False),
    (422, {"title": "Input validation failed", "detail": "- input: prompt is required\n", "status": 422},
     "invalid_input", False),
])
@respx.mock
async def test_client_errors_are_final(status: int, body: dict, code: str, retryable: bool) -> None:
    route = respx.post(CHAT_URL).mock(return_value=httpx.Response(status, json=body))
    with pytest.raises(ProviderError) as error:
        await predict(settings())
    assert (error.value.code, error.value.retryable, route.call_count) == (code, retryable, 1)
    assert body["detail"].split("\n")[0] in error.value.message


@respx.mock
async def test_429_with_retry_after_is_retried_after_that_long(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("asyncio.sleep", fake_sleep)
    route = respx.post(CHAT_URL).mock(side_effect=[
        httpx.Response(429, headers={"Retry-After": "1.5"}, json={"detail": "Request was throttled.", "status": 429}),
        httpx.Response(429, json={"detail": "Request was throttled. Your rate limit resets in ~2s.", "status": 429}),
        httpx.Response(201, json=prediction()),
    ])
    assert (await predict(settings())).text == "Navy goes with camel."
    assert route.call_count == 3 and slept[:2] == [1.5, 2.0]


@respx.mock
async def test_429_longer_than_the_cap_goes_back_to_the_run_with_its_delay() -> None:
    route = respx.post(CHAT_URL).mock(return_value=httpx.Response(
        429, json={"detail": "Request was throttled. Your rate limit resets in ~30s.", "status": 429}))
    with pytest.raises(ProviderError) as error:
        await predict(settings())
    assert (error.value.code, error.value.retry_after, route.call_count) == ("rate_limited", 30.0, 1)


@pytest.mark.parametrize("failure", [
    httpx.Response(500, json={"title": "Internal Server Error", "detail": "boom", "status": 500}),
    httpx.Response(503, text="upstream unavailable"),
    httpx.ConnectError("connection refused"),
])
@respx.mock
async def test_server_and_network_errors_are_retried_then_reported(failure: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_sleep(_: float) -> None:
        return None

    monkeypatch.setattr("asyncio.sleep", no_sleep)
    route = respx.post(CHAT_URL).mock(side_effect=[failure] * 4)
    with pytest.raises(ProviderError) as error:
        await predict(settings(replicate_max_http_retries=3))
    assert route.call_count == 4
    assert error.value.code == "provider_unavailable" and error.value.retryable


@respx.mock
async def test_a_server_error_then_success(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_sleep(_: float) -> None:
        return None

    monkeypatch.setattr("asyncio.sleep", no_sleep)
    respx.post(CHAT_URL).mock(side_effect=[httpx.Response(502, text="bad gateway"), httpx.Response(201, json=prediction())])
    assert (await predict(settings())).text == "Navy goes with camel."


@respx.mock
async def test_a_read_timeout_on_create_is_not_repeated() -> None:
    route = respx.post(CHAT_URL).mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(ProviderError) as error:
        await predict(settings())
    assert (error.value.code, error.value.retryable, route.call_count) == ("timeout", True, 1)


@respx.mock
async def test_a_prediction_past_its_deadline_is_cancelled() -> None:
    respx.post(CHAT_URL).mock(return_value=httpx.Response(201, json=prediction("processing", output=[])))
    respx.get(f"{BASE}/v1/predictions/p1").mock(return_value=httpx.Response(200, json=prediction("processing", output=[])))
    cancel = respx.post(f"{BASE}/v1/predictions/p1/cancel").mock(
        return_value=httpx.Response(200, json=prediction("canceled", output=[])))
    with pytest.raises(ProviderError) as error:
        await predict(settings(prediction_timeout_seconds=0.3))
    assert error.value.code == "timeout" and error.value.prediction_id == "p1" and cancel.call_count == 1


@pytest.mark.parametrize(("body", "code"), [
    (prediction("failed", output=None, error="CUDA out of memory"), "model_failed"),
    (prediction("canceled", output=None), "model_failed"),
    (prediction(output={"not": "text"}), "invalid_output"),
    (prediction(output=[1, 2, 3]), "invalid_output"),
    (prediction(output=["  "]), "invalid_output"),
    ({"detail": "no id here"}, "invalid_output"),
])
@respx.mock
async def test_unusable_predictions(body: dict, code: str) -> None:
    respx.post(CHAT_URL).mock(return_value=httpx.Response(201, json=body))
    with pytest.raises(ProviderError) as error:
        await predict(settings(replicate_max_http_retries=0))
    assert error.value.code == code and error.value.retryable


@respx.mock
async def test_non_json_answer_is_invalid_output() -> None:
    respx.post(CHAT_URL).mock(return_value=httpx.Response(201, text="<html>oops</html>"))
    with pytest.raises(ProviderError) as error:
        await predict(settings(replicate_max_http_retries=0))
    assert error.value.code == "invalid_output"


async def test_no_token_is_unauthorized_without_a_request() -> None:
    with respx.mock(assert_all_called=False) as mock:
        route = mock.post(CHAT_URL)
        with pytest.raises(ProviderError) as error:
            await predict(Settings(replicate_base_url=BASE))
        assert error.value.code == "unauthorized" and not route.called


def test_cost_per_token_and_per_second() -> None:
    # llama-3-8b: $0.05 / 1M input tokens, $0.25 / 1M output tokens
    assert estimate_cost(DEFAULT_CHAT_MODEL, 1000, 2000, 1.0) == Decimal("0.000550")
    # llava-13b: $0.000725 per second of predict_time
    assert estimate_cost(DEFAULT_VISION_MODEL, None, None, 2.5) == Decimal("0.001813")
    assert estimate_cost(DEFAULT_VISION_MODEL, None, None, None) is None


@respx.mock
async def test_creates_are_spread_under_replicates_rate_limit() -> None:
    import time

    sent_at: list[float] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent_at.append(time.monotonic())
        return httpx.Response(201, json=prediction())

    respx.post(CHAT_URL).mock(side_effect=record)
    s = settings(replicate_max_creates_per_minute=120)  # a bucket of 2 a second
    async with httpx.AsyncClient() as http:
        client = ReplicateClient(http, s)
        await asyncio.gather(*(client.predict(DEFAULT_CHAT_MODEL, {"prompt": "hi"}) for _ in range(4)))
    # The bucket lets two through at once; the next two wait for it to drain (0.5 s each).
    assert sent_at[3] - sent_at[0] >= 0.9


@pytest.mark.parametrize(("header", "expected"), [
    ("2", 2.0), ("0.5", 0.5), ("-3", 0.0), (":", None), ("soon", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ("99999999", 3600.0),
])
def test_retry_after_is_read_defensively(header: str, expected: float | None) -> None:
    from worker.provider import parse_retry_after

    assert parse_retry_after(httpx.Response(429, headers={"Retry-After": header}), "") == expected
