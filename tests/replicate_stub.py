"""A loopback HTTP server that answers what a test tells it to and records every request, so the
Replicate client is tested through its real aiohttp session over a real socket (the role respx
plays for httpx clients).

    async with ReplicateStub() as stub:
        route = stub.post(r"/v1/models/.+/predictions").respond(201, json={...})
        route = stub.get(r"/v1/predictions/p1").side_effect(Reply(200, json=...), Reply(200, json=...))
        ... ReplicateClient(session, settings with replicate_base_url=stub.base_url) ...
        route.call_count, route.calls[-1].json(), route.calls[-1].headers["Authorization"]

A route answers with its queued replies in order, then with its `respond` reply; a request no
route matches, or a route with nothing left to say, gets a 599 (so a test fails loudly). Besides
a `Reply`, a route can `DROP` the connection without answering or `HANG` until the server stops,
or call a function of the request that returns a Reply."""

from __future__ import annotations

import asyncio
import json as jsonlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

DROP = "drop"  # close the connection without an answer
HANG = "hang"  # never answer


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    text: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> web.Response:
        if self.text is not None:
            return web.Response(status=self.status, text=self.text, headers=self.headers)
        return web.Response(status=self.status, body=jsonlib.dumps(self.json).encode(),
                            headers={"Content-Type": "application/json", **self.headers})


@dataclass
class Call:
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    at: float  # time.monotonic() when it arrived
    query: str = ""  # the query string, without the "?"

    def json(self) -> Any:
        return jsonlib.loads(self.body)


Answer = Reply | str | Callable[[Call], Reply]


class Route:
    def __init__(self, method: str, path: str) -> None:
        self.method = method
        self.pattern = re.compile(path)
        self.calls: list[Call] = []
        self._queue: list[Answer] = []
        self._default: Answer | None = None

    def respond(self, status: int = 200, *, json: Any = None, text: str | None = None,
                headers: dict[str, str] | None = None) -> Route:
        return self.always(Reply(status, json, text, headers or {}))

    def always(self, answer: Answer) -> Route:
        self._default = answer
        return self

    def side_effect(self, *answers: Answer) -> Route:
        self._queue.extend(answers)
        return self

    @property
    def call_count(self) -> int:
        return len(self.calls)

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def next_answer(self) -> Answer | None:
        return self._queue.pop(0) if self._queue else self._default


class ReplicateStub:
    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.unmatched: list[Call] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    def route(self, method: str, path: str) -> Route:
        route = Route(method, path)
        self.routes.append(route)
        return route

    def post(self, path: str) -> Route:
        return self.route("POST", path)

    def get(self, path: str) -> Route:
        return self.route("GET", path)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        call = Call(request.method, request.path, request.headers, await request.read(), time.monotonic(),
                    request.query_string)
        for route in self.routes:
            if route.method == request.method and route.pattern.fullmatch(request.path):
                route.calls.append(call)
                answer = route.next_answer()
                break
        else:
            self.unmatched.append(call)
            answer = None
        if answer is None:
            return web.Response(status=599, text=f"stub: nothing to answer {request.method} {request.path}")
        if answer == DROP:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=599)  # never sent: the connection is gone
        if answer == HANG:
            await asyncio.Event().wait()
        if callable(answer):
            answer = answer(call)
        assert isinstance(answer, Reply)
        return answer.response()

    async def __aenter__(self) -> ReplicateStub:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
