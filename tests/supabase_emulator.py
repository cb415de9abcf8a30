"""A loopback stand-in for the two Supabase servers the worker talks to, speaking their wire formats:

- PostgREST RPC: `POST /rest/v1/rpc/<fn>` with `apikey` and `Authorization: Bearer <jwt>`. The
  call runs on the real database the way PostgREST runs it: one transaction, the JWT's role set
  with `set_config('role', …, true)`, the claims in `request.jwt.claims`, named arguments, a JSON
  body (bare value, array of rows, or 204 for void) and PostgREST's error objects and statuses.
- Realtime: `GET /realtime/v1/websocket?apikey=…&vsn=1.0.0`, Phoenix V1 JSON frames: phx_join
  with a postgres_changes config answered by phx_reply with binding ids, then the "Subscribed to
  PostgreSQL" system message, heartbeats, phx_leave, and `postgres_changes` pushes with
  `data.record` and `ids`. Changes come from a capture trigger this emulator installs in the test
  database (the real server reads the WAL); filters `col=eq.value` are applied.

Faults for tests: `drop_connections()` closes every socket abnormally, `refuse_for(seconds)`
answers websocket upgrades with 503 meanwhile, `pause_changes()` stops delivering changes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import jwt
import psycopg
from aiohttp import WSCloseCode, WSMsgType, web
from psycopg import sql

JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def make_jwt(role: str, **claims: Any) -> str:
    payload = {"iss": "supabase", "role": role, "iat": int(time.time()), "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def pg_error_status(sqlstate: str, authed: bool) -> int:
    """PostgREST's SQLSTATE -> HTTP status mapping (src/PostgREST/Error.hs)."""
    if sqlstate == "42501":
        return 403 if authed else 401
    if sqlstate in ("23505", "23503"):
        return 409
    if sqlstate == "P0001":
        return 400
    if sqlstate.startswith("P0"):
        return 500
    if sqlstate in ("42883", "42P01"):
        return 404
    if sqlstate.startswith(("08", "53")):
        return 503
    if sqlstate.startswith(("25", "57", "58", "XX", "40", "54", "55")):
        return 500
    if sqlstate.startswith("PT") and sqlstate[2:].isdigit():
        return int(sqlstate[2:])
    return 400


def error_body(code: str, message: str, details: str | None = None, hint: str | None = None) -> dict[str, Any]:
    return {"code": code, "details": details, "hint": hint, "message": message}


@dataclass
class Binding:
    id: int
    event: str
    schema: str
    table: str | None
    filter: str | None
    raw: dict[str, Any]

    def matches(self, schema: str, table: str, event: str, record: dict[str, Any]) -> bool:
        if self.schema != schema or (self.table and self.table != table) or self.event not in ("*", event):
            return False
        if self.filter:
            column, _, condition = self.filter.partition("=")
            op, _, value = condition.partition(".")
            if op != "eq" or str(record.get(column)) != value:
                return False
        return True


@dataclass
class Subscription:
    ws: web.WebSocketResponse
    topic: str
    bindings: list[Binding]


CAPTURE_SQL = """
create or replace function public.realtime_emulator_capture() returns trigger
language plpgsql as $$
begin
  perform pg_notify('realtime_emulator', json_build_object(
    'schema', tg_table_schema, 'table', tg_table_name, 'type', tg_op, 'id', new.id,
    'commit_timestamp', to_char(now() at time zone 'utc', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))::text);
  return null;
end $$;
drop trigger if exists realtime_emulator_capture on public.assistant_messages;
create trigger realtime_emulator_capture after insert on public.assistant_messages
  for each row execute function public.realtime_emulator_capture();
"""


@dataclass
class SupabaseEmulator:
    db_url: str
    base_url: str = ""
    service_role_key: str = field(default_factory=lambda: make_jwt("service_role"))
    rpc_calls: list[dict[str, Any]] = field(default_factory=list)
    joins: list[dict[str, Any]] = field(default_factory=list)
    signed: list[dict[str, Any]] = field(default_factory=list)
    broadcasts: list[dict[str, Any]] = field(default_factory=list)
    subscriptions: list[Subscription] = field(default_factory=list)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    refuse_until: float = 0.0
    changes_paused: bool = False
    delivered: int = 0
    _runner: web.AppRunner | None = None
    _listener: asyncio.Task[None] | None = None


    async def start(self) -> str:
        async with await psycopg.AsyncConnection.connect(self.db_url, autocommit=True) as conn:
            await conn.execute(CAPTURE_SQL)
        app = web.Application()
        app.router.add_post("/rest/v1/rpc/{fn}", self._rpc)
        app.router.add_get("/realtime/v1/websocket", self._websocket)
        app.router.add_post("/storage/v1/object/sign/{bucket}/{path:.+}", self._sign)
        app.router.add_post("/realtime/v1/api/broadcast", self._broadcast)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        self._listener = asyncio.create_task(self._listen_changes())
        return self.base_url

    async def stop(self) -> None:
        if self._listener:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner:
            await self._runner.cleanup()

    # -- faults ---------------------------------------------------------------------------------
    async def drop_connections(self) -> None:
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"simulated outage")
        self.subscriptions.clear()

    def refuse_for(self, seconds: float) -> None:
        self.refuse_until = time.monotonic() + seconds

    # -- PostgREST ------------------------------------------------------------------------------
    @staticmethod
    def _claims(request: web.Request) -> dict[str, Any] | web.Response:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else request.headers.get("apikey")
        if not token:
            return {"role": "anon"}
        try:
            return jwt.decode(token, JWT_SECRET, algorithms=["HS256"], options={"verify_aud": False})
        except jwt.PyJWTError as exc:
            return web.json_response(error_body("PGRST301", str(exc)), status=401,
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def _rpc(self, request: web.Request) -> web.StreamResponse:
        claims = self._claims(request)
        if isinstance(claims, web.Response):
            return claims
        fn = request.match_info["fn"]
        try:
            args = await request.json() if request.can_read_body else {}
        except ValueError:
            return web.json_response(error_body("PGRST102", "Empty or invalid json"), status=400)
        if not isinstance(args, dict):
            return web.json_response(error_body("PGRST102", "Expected a JSON object"), status=400)
        self.rpc_calls.append({"fn": fn, "args": args, "headers": dict(request.headers)})
        try:
            async with await psycopg.AsyncConnection.connect(self.db_url) as conn:
                found = await (await conn.execute(
                    """select p.proretset, p.prorettype = 'void'::regtype, coalesce(p.proargnames, '{}'),
                              array(select format_type(t, null) from unnest(p.proargtypes) t),
                              t.typtype = 'c' or p.prorettype = 'record'::regtype
                         from pg_proc p join pg_type t on t.oid = p.prorettype
                        where p.pronamespace = 'public'::regnamespace and p.proname = %s""", (fn,))).fetchall()
                names = sorted(args)
                match = [f for f in found if set(names) <= set(f[2][:len(f[3])])]
                if not match:
                    return web.json_response(error_body(
                        "PGRST202", f"Could not find the function public.{fn}({', '.join(names)}) in the schema cache",
                        f"Searched for the function public.{fn} with parameters {', '.join(names)}, but no matches were found in the schema cache."),
                        status=404)
                returns_set, returns_void, arg_names, arg_types, composite = match[0]
                types = dict(zip(arg_names, arg_types, strict=False))  # OUT args have names but no types
                call = sql.SQL("public.{}({})").format(sql.Identifier(fn), sql.SQL(", ").join(
                    sql.SQL("{} => {}::{}").format(sql.Identifier(n), sql.Placeholder(n), sql.SQL(types[n])) for n in names))
                params = {n: (json.dumps(args[n]) if types[n] in ("jsonb", "json") or isinstance(args[n], (dict, list))
                              else None if args[n] is None else str(args[n]).lower() if isinstance(args[n], bool)
                              else str(args[n])) for n in names}
                if returns_set or composite:
                    query = sql.SQL("select coalesce(json_agg(_r), '[]'::json) from {} _r").format(call)
                    if composite and not returns_set:
                        query = sql.SQL("select to_json(_r) from {} _r").format(call)
                else:
                    query = sql.SQL("select to_json({})").format(call)
                async with conn.transaction():
                    await conn.execute(
                        "select set_config('search_path', '\"public\", \"extensions\"', true), set_config('role', %s, true),"
                        " set_config('request.jwt.claims', %s, true), set_config('request.method', 'POST', true),"
                        " set_config('request.path', %s, true)",
                        (claims.get("role", "anon"), json.dumps(claims), f"/rpc/{fn}"))
                    row = await (await conn.execute(query, params)).fetchone()
        except psycopg.Error as exc:
            diag = exc.diag
            state = exc.sqlstate or "XX000"
            return web.json_response(error_body(state, diag.message_primary or str(exc), diag.message_detail, diag.message_hint),
                                     status=pg_error_status(state, "role" in claims))
        if returns_void:
            return web.Response(status=204)
        return web.Response(status=200, content_type="application/json", charset="utf-8", text=json.dumps(row[0]))

    # -- Realtime Broadcast over REST ----------------------------------------------------------
    async def _broadcast(self, request: web.Request) -> web.StreamResponse:
        """`POST /realtime/v1/api/broadcast` {"messages": [{topic, event, payload, private}]} -> 202."""
        claims = self._claims(request)
        if isinstance(claims, web.Response):
            return claims
        if request.headers.get("apikey") is None:
            return web.json_response({"message": "No API key found in request"}, status=401)
        body = await request.json()
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"topic", "event", "payload"} <= set(m)
                                                     for m in messages):
            return web.json_response({"errors": {"messages": ["is invalid"]}}, status=422)
        for message in messages:
            self.broadcasts.append({**message, "role": claims.get("role")})
        return web.Response(status=202)

    # -- Storage --------------------------------------------------------------------------------
    async def _sign(self, request: web.Request) -> web.StreamResponse:
        """Storage API: a signed URL for an object, relative to /storage/v1."""
        claims = self._claims(request)
        if isinstance(claims, web.Response):
            return claims
        bucket, path = request.match_info["bucket"], request.match_info["path"]
        body = await request.json()
        self.signed.append({"bucket": bucket, "path": path, "expiresIn": body.get("expiresIn"), "role": claims.get("role")})
        async with await psycopg.AsyncConnection.connect(self.db_url) as conn:
            found = await (await conn.execute("select 1 from storage.objects where bucket_id = %s and name = %s",
                                              (bucket, path))).fetchone()
        if not found or claims.get("role") != "service_role":
            return web.json_response({"statusCode": "404", "error": "not_found", "message": "Object not found"}, status=400)
        token = jwt.encode({"url": f"{bucket}/{path}", "iat": int(time.time()),
                            "exp": int(time.time()) + int(body.get("expiresIn", 60))}, JWT_SECRET, algorithm="HS256")
        return web.json_response({"signedURL": f"/object/sign/{bucket}/{path}?token={token}"})

    # -- Realtime -------------------------------------------------------------------------------
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if time.monotonic() < self.refuse_until:
            return web.Response(status=503, text="realtime unavailable")
        try:
            jwt.decode(request.query.get("apikey", ""), JWT_SECRET, algorithms=["HS256"], options={"verify_aud": False})
        except jwt.PyJWTError:
            return web.Response(status=403, text="invalid apikey")
        if request.query.get("vsn", "1.0.0") != "1.0.0":
            return web.Response(status=400, text="unsupported vsn")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                await self._handle_frame(ws, json.loads(frame.data))
        finally:
            self.sockets.discard(ws)
            self.subscriptions = [s for s in self.subscriptions if s.ws is not ws]
        return ws

    @staticmethod
    async def _send(ws: web.WebSocketResponse, topic: str, event: str, payload: Any, ref: str | None) -> None:
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await ws.send_str(json.dumps({"event": event, "payload": payload, "ref": ref, "topic": topic}))

    async def _handle_frame(self, ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
        topic, event, ref = message.get("topic"), message.get("event"), message.get("ref")
        payload = message.get("payload") or {}
        if topic == "phoenix" and event == "heartbeat":
            await self._send(ws, "phoenix", "phx_reply", {"response": {}, "status": "ok"}, ref)
        elif event == "phx_join":
            self.joins.append(message)
            config = payload.get("config") or {}
            bindings = []
            for raw in config.get("postgres_changes") or []:
                binding_id = zlib.crc32(json.dumps(raw, sort_keys=True).encode()) % (2**27 - 1) + 1
                bindings.append(Binding(binding_id, raw.get("event", "*"), raw.get("schema", "public"),
                                        raw.get("table"), raw.get("filter"), raw))
            response = {"postgres_changes": [{**b.raw, "id": b.id} for b in bindings]}
            await self._send(ws, topic, "phx_reply", {"response": response, "status": "ok"}, ref)
            self.subscriptions.append(Subscription(ws, topic, bindings))
            if bindings:
                await asyncio.sleep(0.05)  # the real server subscribes to the WAL after replying
                await self._send(ws, topic, "system", {"channel": topic.removeprefix("realtime:"),
                                                        "extension": "postgres_changes",
                                                        "message": "Subscribed to PostgreSQL", "status": "ok"}, None)
        elif event == "phx_leave":
            self.subscriptions = [s for s in self.subscriptions if not (s.ws is ws and s.topic == topic)]
            await self._send(ws, topic, "phx_reply", {"response": {}, "status": "ok"}, ref)
            await self._send(ws, topic, "phx_close", {}, message.get("join_ref"))
        elif event == "access_token":
            pass  # the real server never replies

    async def _listen_changes(self) -> None:
        while True:
            try:
                # Notifications on one connection, row lookups on another (a connection that is
                # iterating notifies() cannot run queries).
                async with await psycopg.AsyncConnection.connect(self.db_url, autocommit=True) as listener, \
                        await psycopg.AsyncConnection.connect(self.db_url, autocommit=True) as conn:
                    await listener.execute("listen realtime_emulator")
                    async for notify in listener.notifies():
                        if not self.changes_paused:
                            await self._deliver(conn, json.loads(notify.payload))
            except psycopg.OperationalError:
                await asyncio.sleep(0.2)

    async def _deliver(self, conn: psycopg.AsyncConnection, change: dict[str, Any]) -> None:
        schema, table = change["schema"], change["table"]
        row = await (await conn.execute(
            sql.SQL("select to_jsonb(t) from {}.{} t where id = %s").format(sql.Identifier(schema), sql.Identifier(table)),
            (change["id"],))).fetchone()
        if row is None:
            return
        record = row[0]
        columns = await (await conn.execute(
            """select a.attname, t.typname from pg_attribute a join pg_type t on t.oid = a.atttypid
                where a.attrelid = format('%%I.%%I', %s::text, %s::text)::regclass and a.attnum > 0 and not a.attisdropped
                order by a.attnum""", (schema, table))).fetchall()
        for subscription in list(self.subscriptions):
            ids = [b.id for b in subscription.bindings if b.matches(schema, table, change["type"], record)]
            if not ids:
                continue
            data = {"columns": [{"name": n, "type": t} for n, t in columns], "commit_timestamp": change["commit_timestamp"],
                    "errors": None, "schema": schema, "table": table, "record": record, "type": change["type"]}
            await self._send(subscription.ws, subscription.topic, "postgres_changes", {"data": data, "ids": ids}, None)
            self.delivered += 1
