"""A local stand-in for Replicate's predictions API, for the quickstart, tests and benchmarks.

It speaks the documented HTTP API on loopback: `POST /v1/models/{owner}/{name}/predictions`
(official models), `POST /v1/predictions` (by version), `GET /v1/predictions/{id}`,
`POST /v1/predictions/{id}/cancel`, with `Prefer: wait[=N]`, `Authorization: Bearer`, prediction
objects with `urls` pointing back at itself, `metrics`, and problem+json errors. Latency, the
reply and faults are configurable; faults are consumed in order, one per create request, or one
per read (`GET /v1/predictions/{id}`) for faults injected with `on="get"`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import random
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

PREFER_WAIT = re.compile(r"^wait(?:=(\d+))?$")


@dataclass
class Fault:
    """One injected fault for the next create request.

    kind: `http` (answer `status` with a problem+json body, `retry_after` as header if set,
    `detail` as message), `failed` / `canceled` (the prediction ends so), `malformed` (the
    prediction succeeds with an output that is not text), `garbage` (a 201, or 200 for a read, that is not JSON),
    `hang` (the create request never answers), `lost` (the prediction is created and runs, but
    the create's answer never comes: a timeout that leaves a prediction behind), `stream_error` (the stream sends an `error`
    event halfway and the prediction fails), `stream_break` (the stream is cut halfway, the
    prediction itself succeeds), `stream_stall` (the stream falls silent halfway and stays open,
    the prediction itself succeeds).

    on: `create` (the default) or `get`: a read of a prediction answers with the fault instead
    (kinds `http`, `garbage` and `hang` only), and the prediction itself goes on."""

    kind: str
    status: int = 500
    retry_after: float | None = None
    detail: str | None = None
    on: str = "create"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: CIMultiDict[str]  # header names are case-insensitive, as in HTTP
    body: dict[str, Any] | None


@dataclass
class SimPrediction:
    id: str
    model: str
    version: str
    input: dict[str, Any]
    created: float
    latency: float
    tokens: list[str]
    base_url: str
    end_as: str = "succeeded"
    error: str | None = None
    canceled_at: float | None = None
    output_override: Any = None
    stream_fault: str | None = None
    # Set when a create held by Prefer: wait should answer before its wait is up: the
    # prediction ended by hand or was canceled (as Replicate answers a held create once the
    # prediction ends), or a test lets it go with the prediction still running.
    answer_now: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def end_now(self) -> None:
        """Ends the prediction now (as `end_as` says); a create held for it answers."""
        self.latency = time.time() - self.created
        self.answer_now.set()

    @property
    def starts_at(self) -> float:
        """When it leaves `starting` for `processing`."""
        return self.created + min(0.01, self.latency)

    def status(self, now: float) -> str:
        if self.canceled_at is not None:
            return "canceled"
        if now >= self.created + self.latency:
            return self.end_as
        return "processing" if now >= self.starts_at else "starting"

    def to_json(self, now: float) -> dict[str, Any]:
        status = self.status(now)
        done = status in ("succeeded", "failed", "canceled")
        iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")  # noqa: E731
        output: Any = None
        if status == "succeeded":
            output = self.output_override if self.output_override is not None else self.tokens
        elif status == "processing":
            output = []
        body: dict[str, Any] = {
            "id": self.id, "model": self.model, "version": self.version, "input": self.input, "logs": "",
            "output": output, "data_removed": False, "error": self.error if status == "failed" else None,
            "status": status, "source": "api", "created_at": iso(self.created),
            "urls": {"get": f"{self.base_url}/v1/predictions/{self.id}",
                     "cancel": f"{self.base_url}/v1/predictions/{self.id}/cancel",
                     "stream": f"{self.base_url}/v1/streams/{self.id}"},
        }
        if (self.canceled_at if self.canceled_at is not None else now) >= self.starts_at:  # canceled while starting: never
            body["started_at"] = iso(self.created)
        if done:
            end = self.canceled_at or (self.created + self.latency)
            body["completed_at"] = iso(end)
            prompt = str(self.input.get("prompt", ""))
            body["metrics"] = {"predict_time": round(end - self.created, 6), "total_time": round(end - self.created, 6)}
            if status == "succeeded" and self.model.startswith("meta/"):
                body["metrics"].update(input_token_count=len(prompt) // 4 + 1, output_token_count=len(self.tokens),
                                       time_to_first_token=round(self.latency / 2, 6))
        return body


def default_reply(model_input: dict[str, Any]) -> str:
    """A deterministic reply that shows what the model was asked, with follow-up questions when
    the system prompt asks for them."""
    prompt = str(model_input.get("prompt", ""))
    last = prompt.rsplit("<|start_header_id|>user<|end_header_id|>", 1)[-1]
    last = last.split("<|eot_id|>", 1)[0].strip().rsplit("User:", 1)[-1].strip().rsplit("\n\n", 1)[-1]
    seen = " with an image" if model_input.get("image") else ""
    reply = f"You said{seen}: {last[:200]}"
    if "<<follow-ups>>" in prompt:
        reply += "\n<<follow-ups>>\n1. Can you give an example?\n2. What should I avoid?"
    return reply


EMBEDDING_DIMENSIONS = 768
STOPWORDS = frozenset("a an and are as at be by do does for from how i in is it my of on or the to what with you".split())
_token_vectors: dict[str, list[float]] = {}


def embed_text(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic bag-of-words embedding: texts that share words are close in cosine
    distance, which is all retrieval tests need from a stand-in for an embedding model."""
    total = [0.0] * dimensions
    for token in re.findall(r"[a-z0-9]+", text.lower()):
        if token in STOPWORDS:
            continue
        vector = _token_vectors.get(token)
        if vector is None:
            rng = random.Random(hashlib.sha256(token.encode()).digest())
            vector = _token_vectors[token] = [rng.gauss(0, 1) for _ in range(dimensions)]
        total = [a + b for a, b in zip(total, vector, strict=True)]
    norm = math.sqrt(sum(x * x for x in total)) or 1.0
    return [x / norm for x in total]


def embedding_output(model_input: dict[str, Any]) -> list[dict[str, list[float]]] | None:
    """The output of an embedding model (all-mpnet-base-v2's shape), or None for other inputs."""
    if "text_batch" in model_input:
        texts = json.loads(model_input["text_batch"])
    elif "text" in model_input and "prompt" not in model_input:
        texts = [model_input["text"]]
    else:
        return None
    return [{"embedding": embed_text(str(text))} for text in texts]


def tokenize(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) or [text]


@dataclass
class ReplicateSimulator:
    latency: float = 0.0
    reply: Any = default_reply  # callable(input) -> str
    token: str | None = None  # when set, only this bearer token is accepted
    faults: list[Fault] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    predictions: dict[str, SimPrediction] = field(default_factory=dict)
    base_url: str = ""
    list_page_size: int = 100  # GET /v1/predictions: Replicate's 100 a page
    _runner: web.AppRunner | None = None
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    def inject(self, *faults: Fault) -> None:
        for fault in faults:
            if fault.on not in ("create", "get") or (fault.on == "get" and fault.kind not in ("http", "garbage", "hang")):
                raise ValueError(f"a fault cannot be {fault.kind} on {fault.on}")
        self.faults.extend(faults)

    def _next_fault(self, on: str) -> Fault | None:
        for index, fault in enumerate(self.faults):
            if fault.on == on:
                return self.faults.pop(index)
        return None

    async def _refusal(self, fault: Fault | None, ok_status: int) -> web.Response | None:
        """The answer to a request that meets an http, garbage or hang fault; None otherwise."""
        if fault and fault.kind == "hang":
            await self._closing.wait()  # until the client gives up, or the simulator stops
            return web.Response(status=503)
        if fault and fault.kind == "garbage":
            return web.Response(status=ok_status, text="<html>bad gateway</html>", content_type="text/html")
        if fault and fault.kind == "http":
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
            titles = {429: "Too Many Requests", 402: "Insufficient credit", 401: "Unauthenticated", 422: "Input validation failed"}
            return self._problem(fault.status, titles.get(fault.status, "Server error"),
                                 fault.detail or "simulated failure", headers)
        return None

    @property
    def creates(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/predictions")]

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/v1/models/{owner}/{name}/predictions", self._create_official)
        app.router.add_post("/v1/predictions", self._create_version)
        app.router.add_get("/v1/predictions", self._list)
        app.router.add_get("/v1/predictions/{id}", self._get)
        app.router.add_post("/v1/predictions/{id}/cancel", self._cancel)
        app.router.add_get("/v1/streams/{id}", self._stream)
        app.router.add_get("/v1/account", self._account)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        self.base_url = f"http://{host}:{bound[1]}"
        return self.base_url

    async def stop(self) -> None:
        self._closing.set()
        if self._runner:
            await self._runner.cleanup()

    # -- handlers -------------------------------------------------------------------------------
    @staticmethod
    def _problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(status=status, headers=headers, content_type="application/problem+json",
                            text=json.dumps({"title": title, "detail": detail, "status": status}))

    async def _record(self, request: web.Request) -> tuple[RecordedRequest, web.Response | None]:
        body = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                body = None
        recorded = RecordedRequest(request.method, request.path, CIMultiDict(request.headers), body)
        self.requests.append(recorded)
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:] or (self.token is not None and auth[7:] != self.token):
            return recorded, self._problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        return recorded, None

    async def _create_official(self, request: web.Request) -> web.StreamResponse:
        model = f"{request.match_info['owner']}/{request.match_info['name']}"
        return await self._create(request, model, None)

    async def _create_version(self, request: web.Request) -> web.StreamResponse:
        return await self._create(request, None, None)

    async def _create(self, request: web.Request, model: str | None, _: Any) -> web.StreamResponse:
        recorded, refusal = await self._record(request)
        if refusal:
            return refusal
        body = recorded.body
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return self._problem(422, "Input validation failed", "- input: input is required")
        version = "dp-simulated"
        if model is None:
            if not isinstance(body.get("version"), str):
                return self._problem(422, "Invalid version or not permitted", "The specified version does not exist")
            version = body["version"]
            model = version.split(":")[0] if "/" in version else "yorickvp/llava-13b"
        prefer = PREFER_WAIT.match(request.headers.get("Prefer", ""))
        if request.headers.get("Prefer") and not prefer:
            return self._problem(422, "Invalid Prefer header", "Prefer must be wait or wait=N")

        fault = self._next_fault("create")
        refusal = await self._refusal(fault, 201)
        if refusal is not None:
            return refusal

        model_input = body["input"]
        embeddings = embedding_output(model_input)
        text = "" if embeddings is not None else self.reply(model_input)
        prediction = SimPrediction(
            id=f"sim{next(self._ids):06d}{secrets.token_hex(4)}", model=model, version=version, input=model_input,
            created=time.time(), latency=self.latency, tokens=tokenize(text), base_url=self.base_url)
        if embeddings is not None:
            prediction.output_override = embeddings
        if fault and fault.kind in ("failed", "canceled"):
            prediction.end_as = fault.kind
            prediction.error = fault.detail or ("CUDA out of memory" if fault.kind == "failed" else None)
        if fault and fault.kind == "malformed":
            prediction.output_override = {"unexpected": True}
        if fault and fault.kind in ("stream_error", "stream_break", "stream_stall"):
            prediction.stream_fault = fault.kind
            if fault.kind == "stream_error":
                prediction.end_as, prediction.error = "failed", "the model crashed while streaming"
        self.predictions[prediction.id] = prediction
        if fault and fault.kind == "lost":
            await self._closing.wait()  # created, running, and never answered
            return web.Response(status=503)
        if prefer:
            wait = min(float(prefer.group(1) or 60), prediction.latency)
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await prediction.answer_now.wait()
        headers = {"Preference-Applied": request.headers["Prefer"]} if prefer else None
        return web.json_response(prediction.to_json(time.time()), status=201, headers=headers)

    async def _prediction(self, request: web.Request) -> SimPrediction | web.Response:
        _, refusal = await self._record(request)
        if refusal:
            return refusal
        prediction = self.predictions.get(request.match_info["id"])
        if prediction is None:
            return self._problem(404, "Not found", "The requested resource could not be found.")
        return prediction

    async def _get(self, request: web.Request) -> web.StreamResponse:
        prediction = await self._prediction(request)
        if isinstance(prediction, web.Response):
            return prediction
        refusal = await self._refusal(self._next_fault("get"), 200)
        if refusal is not None:
            return refusal
        return web.json_response(prediction.to_json(time.time()))

    async def _list(self, request: web.Request) -> web.StreamResponse:
        """The account's predictions, newest first, a page at a time with `next` / `previous`
        cursor URLs, each prediction as a read returns it (its input included) but for the
        stream URL, which Replicate's list leaves out."""

        def listed(body: dict[str, Any]) -> dict[str, Any]:
            return {**body, "urls": {k: v for k, v in body["urls"].items() if k != "stream"}}

        _, refusal = await self._record(request)
        if refusal:
            return refusal
        newest_first = sorted(self.predictions.values(), key=lambda p: (p.created, p.id), reverse=True)
        try:
            start = max(0, int(request.query.get("cursor", "0")))
        except ValueError:
            return self._problem(400, "Invalid cursor", "The cursor is not one this API gave")
        page = newest_first[start:start + self.list_page_size]
        cursor = lambda at: f"{self.base_url}/v1/predictions?cursor={at}"  # noqa: E731
        now = time.time()
        return web.json_response({
            "next": cursor(start + self.list_page_size) if start + self.list_page_size < len(newest_first) else None,
            "previous": cursor(max(0, start - self.list_page_size)) if start else None,
            "results": [listed(prediction.to_json(now)) for prediction in page]})

    async def _account(self, request: web.Request) -> web.StreamResponse:
        _, refusal = await self._record(request)
        if refusal:
            return refusal
        return web.json_response({"type": "organization", "username": "simulator", "name": "Local simulator",
                                  "github_url": None})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events as Replicate streams them: `output` per token, then `done` (or
        `error`), each with an `id:` line; tokens spread over the prediction's latency."""
        prediction = await self._prediction(request)
        if isinstance(prediction, web.Response):
            return prediction
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        base = int(prediction.created)
        tokens = prediction.tokens if prediction.output_override is None else []
        count = len(tokens)
        for index, token in enumerate(tokens):
            if prediction.stream_fault and index == count // 2:
                if prediction.stream_fault == "stream_error":
                    await response.write(f"event: error\nid: {base}:{index}\ndata: "
                                         f"{json.dumps({'detail': prediction.error})}\n\n".encode())
                    await response.write_eof()
                    return response
                if prediction.stream_fault == "stream_stall":
                    await self._closing.wait()  # silent, open, until the client or the simulator goes
                    return response
                request.transport.close()  # type: ignore[union-attr]  # cut mid-stream, no `done`
                return response
            due = prediction.created + prediction.latency * (index + 1) / (count + 1)
            await asyncio.sleep(max(0.0, due - time.time()))
            if prediction.canceled_at is not None:
                break
            data = "\n".join(f"data: {line}" for line in token.split("\n"))
            await response.write(f"event: output\nid: {base}:{index}\n{data}\n\n".encode())
        if prediction.canceled_at is None:  # a canceled one ends at the next token, as Replicate's stream does
            await asyncio.sleep(max(0.0, prediction.created + prediction.latency - time.time()))
        reason = "{}" if prediction.canceled_at is None else '{"reason": "canceled"}'
        await response.write(f"event: done\nid: {base}:{count}\ndata: {reason}\n\n".encode())
        await response.write_eof()
        return response

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        prediction = await self._prediction(request)
        if isinstance(prediction, web.Response):
            return prediction
        now = time.time()
        if prediction.status(now) in ("starting", "processing"):
            prediction.canceled_at = now
            prediction.answer_now.set()
        return web.json_response(prediction.to_json(now))
