"""A loopback stand-in for the two Supabase servers the worker talks to, speaking their wire formats:

- PostgREST RPC: `POST /rest/v1/rpc/<fn>` with `apikey` and `Authorization: Bearer <jwt>`. The
  call runs on the real database the way PostgREST runs it: one transaction, the JWT's role set
  with `set_config('role', …, true)`, the claims in `request.jwt.claims`, named arguments, a JSON
  body (bare value, array of rows, or 204 for void) and PostgREST's error objects and statuses
  (`{"code", "details", "hint", "message"}`; SQLSTATE -> HTTP status as in PostgREST's
  src/PostgREST/Error.hs; a database it cannot connect to is 503 PGRST000, a connection lost
  during the call 503 PGRST001, no schema cache loaded 503 PGRST002).
- Realtime: `GET /realtime/v1/websocket?apikey=…&vsn=1.0.0`, Phoenix V1 JSON frames: phx_join
  with a postgres_changes config answered by phx_reply with binding ids, then the "Subscribed to
  PostgreSQL" system message (or, when subscribing fails, a system message with status "error"
  while the channel stays joined), heartbeats, phx_leave, a second join of a topic closing the
  first (phx_close with the first join's ref, as Phoenix does), and `postgres_changes` pushes with
  `data.record` (and `data.old_record` for UPDATE: the replica identity, by default the primary
  key) and `ids`. Changes come from a capture trigger this emulator installs on
  assistant_messages and assistant_action_requests (the real server reads the WAL); filters
  `col=eq.value` are applied to the new row.

Faults for tests: `drop_connections()` closes every socket abnormally, `refuse_for(seconds)`
answers websocket upgrades with 503 meanwhile, `stall_connections()` makes every open socket
half-open (silent both ways, never closed), `fail_postgres_changes()` makes subscribing to
database changes fail until `restore_postgres_changes()`, `cut_database()` makes PostgREST's
connections to the database fail until `restore_database()`, `lose_schema_cache()` makes it
answer every request with PGRST002 (its schema cache could not be loaded, as while the database
is being migrated or restarted) until `restore_schema_cache()`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import jwt
import psycopg
from aiohttp import WSCloseCode, WSMsgType, web
from psycopg import sql
from psycopg.conninfo import make_conninfo

JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def make_jwt(role: str, **claims: Any) -> str:
    payload = {"iss": "supabase", "role": role, "iat": int(time.time()), "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def pg_error_status(sqlstate: str, authed: bool, message: str = "") -> int:
    """PostgREST's SQLSTATE -> HTTP status mapping: `mapSQLtoHTTP` in src/PostgREST/Error.hs (the
    table of docs/references/errors.rst, plus the few special cases the source adds)."""
    exact = {"23503": 409, "23505": 409, "25006": 405, "53400": 500, "57P01": 503, "P0001": 400,
             "42P01": 404, "42P17": 500}
    if sqlstate in exact:
        return exact[sqlstate]
    if sqlstate == "42501":
        return 403 if authed else 401
    if sqlstate == "42883":
        return 406 if message.startswith("function xmlagg(") else 404
    if sqlstate == "21000":  # pg-safeupdate's refusal is the client's fault; any other is the server's
        return 400 if message.endswith("requires a WHERE clause") else 500
    if sqlstate == "22023":  # the JWT's role does not exist
        return 401 if message.startswith("role") and message.endswith("does not exist") else 400
    if sqlstate.startswith("PT"):
        return int(sqlstate[2:]) if sqlstate[2:].isdigit() else 500
    by_class = {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500,
                "39": 500, "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500, "57": 500, "58": 500,
                "F0": 500, "HV": 500, "P0": 500, "XX": 500}
    return by_class.get(sqlstate[:2], 400)


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

    def subscribe_error(self) -> str:
        """What Realtime says when it cannot create this subscription (subscription_insert_failed in
        lib/extensions/postgres_cdc_rls/subscriptions.ex), e.g. for a table not in its publication."""
        filters = "[]"
        if self.filter:
            column, _, condition = self.filter.partition("=")
            op, _, value = condition.partition(".")
            filters = f'[{{"{column}", "{op}", "{value}", false}}]'
        return ("Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given"
                f" connect parameters: [event: {self.event}, schema: {self.schema}, table: {self.table or '*'},"
                f" filters: {filters}, select: nil]")


@dataclass
class Subscription:
    ws: web.WebSocketResponse
    topic: str
    bindings: list[Binding]
    join_ref: str | None = None
    subscribed: bool = False  # changes flow only after "Subscribed to PostgreSQL"


# The change as the trigger saw it: the new row (when it fits in a notification; else looked up
# by id), and for UPDATE the old replica identity, which is what the WAL carries: the primary key
# by default, the whole old row with REPLICA IDENTITY FULL.
CAPTURE_SQL = """
create or replace function public.realtime_emulator_capture() returns trigger
language plpgsql as $$
declare
  change jsonb := jsonb_build_object('schema', tg_table_schema, 'table', tg_table_name, 'type', tg_op, 'id', new.id,
    'commit_timestamp', to_char(now() at time zone 'utc', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'));
  identity jsonb;
begin
  if octet_length(to_jsonb(new)::text) < 7000 then
    change := change || jsonb_build_object('record', to_jsonb(new));
  end if;
  if tg_op = 'UPDATE' then
    select case c.relreplident when 'f' then to_jsonb(old) else (
             select coalesce(jsonb_object_agg(a.attname, to_jsonb(old) -> a.attname), '{}'::jsonb)
               from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
              where i.indrelid = tg_relid and case c.relreplident when 'i' then i.indisreplident else i.indisprimary end)
           end
      into identity from pg_class c where c.oid = tg_relid;
    change := change || jsonb_build_object('old_record', identity);
  end if;
  perform pg_notify('realtime_emulator', change::text);
  return null;
end $$;
drop trigger if exists realtime_emulator_capture on public.assistant_messages;
create trigger realtime_emulator_capture after insert or update on public.assistant_messages
  for each row execute function public.realtime_emulator_capture();
drop trigger if exists realtime_emulator_capture on public.assistant_action_requests;
create trigger realtime_emulator_capture after insert or update on public.assistant_action_requests
  for each row execute function public.realtime_emulator_capture();
"""


@dataclass
class SupabaseEmulator:
    db_url: str
    base_url: str = ""
    service_role_key: str = field(default_factory=lambda: make_jwt("service_role"))
    rpc_calls: list[dict[str, Any]] = field(default_factory=list)
    joins: list[dict[str, Any]] = field(default_factory=list)
    joined_at: list[float] = field(default_factory=list)  # time.monotonic() of each join
    signed: list[dict[str, Any]] = field(default_factory=list)
    broadcasts: list[dict[str, Any]] = field(default_factory=list)
    subscriptions: list[Subscription] = field(default_factory=list)
    sockets: set[web.WebSocketResponse] = field(default_factory=set)
    stalled: set[web.WebSocketResponse] = field(default_factory=set)  # half-open: neither read nor written
    _transports: dict[web.WebSocketResponse, asyncio.Transport] = field(default_factory=dict)
    refuse_until: float = 0.0
    postgres_changes_failing: bool = False
    postgres_changes_flapping: float | None = None  # seconds a subscription lasts before it fails
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    database_cut: socket.socket | None = None  # while set: a bound port nobody listens on
    schema_cache_lost: bool = False  # while set: every RPC answers 503 PGRST002
    delivered: int = 0
    refused: int = 0  # websocket upgrades answered 503 while refusing
    changes: list[dict[str, Any]] = field(default_factory=list)  # the postgres_changes payloads sent
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
        self.restore_database()
        for task in list(self._tasks):
            task.cancel()
        if self._listener:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._close_sockets()
        if self._runner:
            await self._runner.cleanup()

    # -- faults ---------------------------------------------------------------------------------
    async def _close_sockets(self, **close: Any) -> None:
        for ws in list(self.stalled):
            self._transports[ws].abort()  # a close handshake would wait for an answer never read
        for ws in list(self.sockets - self.stalled):
            with contextlib.suppress(Exception):
                await ws.close(**close)

    async def drop_connections(self) -> None:
        await self._close_sockets(code=WSCloseCode.INTERNAL_ERROR, message=b"simulated outage")
        self.subscriptions.clear()

    def stall_connections(self) -> None:
        """The network goes silent under every open socket, which stays open (half-open: a NAT
        or a load balancer that forgot the connection): nothing the worker sends is read, its
        pings included, and nothing reaches it, changes included. New connections work."""
        for ws in self.sockets:
            self.stalled.add(ws)
            self._transports[ws].pause_reading()

    def refuse_for(self, seconds: float) -> None:
        self.refuse_until = time.monotonic() + seconds

    async def fail_postgres_changes(self) -> None:
        """Subscribing to database changes fails from now on, as when a table is not in the
        supabase_realtime publication: the join is answered, then a `system` message with status
        "error"; the channel stays joined and nothing is delivered on it. Channels subscribed
        already are resubscribed and fail the same way (what the server does when its CDC process
        restarts). The server does not retry this failure: a channel recovers only by joining again."""
        self.postgres_changes_failing = True
        for subscription in list(self.subscriptions):
            if subscription.bindings:
                await self._subscribe_postgres(subscription)

    def restore_postgres_changes(self) -> None:
        self.postgres_changes_failing = False
        self.postgres_changes_flapping = None

    def flap_postgres_changes(self, lasting: float) -> None:
        """Every new subscription to database changes is confirmed, then fails `lasting` seconds
        later (the error system message on a joined channel), as when the server's change
        capture keeps crashing and restarting."""
        self.postgres_changes_flapping = lasting

    def cut_database(self) -> None:
        """PostgREST loses its database: every RPC's connection is refused (503 PGRST000)."""
        if self.database_cut is None:
            self.database_cut = socket.socket()
            self.database_cut.bind(("127.0.0.1", 0))

    def restore_database(self) -> None:
        if self.database_cut is not None:
            self.database_cut.close()
            self.database_cut = None

    def lose_schema_cache(self) -> None:
        """PostgREST has no schema cache (it could not query the database for it, and retries):
        every request is answered 503 PGRST002 until `restore_schema_cache()`."""
        self.schema_cache_lost = True

    def restore_schema_cache(self) -> None:
        self.schema_cache_lost = False

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
        call: dict[str, Any] = {"fn": fn, "args": args, "headers": dict(request.headers)}
        self.rpc_calls.append(call)
        response = await self._call(fn, args, claims)
        call["status"] = response.status
        return response

    async def _call(self, fn: str, args: dict[str, Any], claims: dict[str, Any]) -> web.Response:
        if self.schema_cache_lost:
            return web.json_response(error_body("PGRST002", "Could not query the database for the schema cache. Retrying."),
                                     status=503)
        url = self.db_url
        if self.database_cut is not None:
            url = make_conninfo(self.db_url, host="127.0.0.1", port=self.database_cut.getsockname()[1])
        try:
            conn = await psycopg.AsyncConnection.connect(url)
        except psycopg.OperationalError as exc:  # hasql's ConnectionUsageError: libpq's message as details
            return web.json_response(error_body("PGRST000", "Database connection error.",
                                                str(exc).removeprefix("connection failed: ") + "\n"), status=503)
        try:
            async with conn:
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
            state = exc.sqlstate
            if state is None:
                if not isinstance(exc, psycopg.OperationalError):
                    raise
                # The connection broke without an error from the server (hasql's ClientError).
                return web.json_response(error_body("PGRST001", "Database client error. Retrying the connection.",
                                                    str(exc) + "\n"), status=503)
            diag = exc.diag
            message = diag.message_primary or str(exc)
            status = pg_error_status(state, claims.get("role", "anon") != "anon", message)
            return web.json_response(error_body(state, message, diag.message_detail, diag.message_hint), status=status,
                                     headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
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
            self.refused += 1
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
        self._transports[ws] = request.transport  # type: ignore[assignment]
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                await self._handle_frame(ws, json.loads(frame.data))
        finally:
            self.sockets.discard(ws)
            self.stalled.discard(ws)
            self._transports.pop(ws, None)
            self.subscriptions = [s for s in self.subscriptions if s.ws is not ws]
        return ws

    async def _send(self, ws: web.WebSocketResponse, topic: str, event: str, payload: Any, ref: str | None) -> None:
        if ws in self.stalled:
            return  # lost on the way
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await ws.send_str(json.dumps({"event": event, "payload": payload, "ref": ref, "topic": topic}))

    async def _handle_frame(self, ws: web.WebSocketResponse, message: dict[str, Any]) -> None:
        topic, event, ref = message.get("topic"), message.get("event"), message.get("ref")
        payload = message.get("payload") or {}
        if topic == "phoenix" and event == "heartbeat":
            await self._send(ws, "phoenix", "phx_reply", {"response": {}, "status": "ok"}, ref)
        elif event == "phx_join":
            self.joins.append(message)
            self.joined_at.append(time.monotonic())
            # Phoenix closes a channel that a second join of its topic replaces (Phoenix.Socket:
            # "Duplicate channel join"): the new join is answered, then phx_close with the old join's ref.
            replaced = [s for s in self.subscriptions if s.ws is ws and s.topic == topic]
            self.subscriptions = [s for s in self.subscriptions if s not in replaced]
            config = payload.get("config") or {}
            bindings = []
            for raw in config.get("postgres_changes") or []:
                binding_id = zlib.crc32(json.dumps(raw, sort_keys=True).encode()) % (2**27 - 1) + 1
                bindings.append(Binding(binding_id, raw.get("event", "*"), raw.get("schema", "public"),
                                        raw.get("table"), raw.get("filter"), raw))
            response = {"postgres_changes": [{**b.raw, "id": b.id} for b in bindings]}
            await self._send(ws, topic, "phx_reply", {"response": response, "status": "ok"}, ref)
            for old in replaced:
                await self._send(ws, topic, "phx_close", {}, old.join_ref)
            subscription = Subscription(ws, topic, bindings, message.get("join_ref") or ref)
            self.subscriptions.append(subscription)
            if bindings:
                await asyncio.sleep(0.05)  # the real server subscribes to the WAL after replying
                await self._subscribe_postgres(subscription)
        elif event == "phx_leave":
            self.subscriptions = [s for s in self.subscriptions if not (s.ws is ws and s.topic == topic)]
            await self._send(ws, topic, "phx_reply", {"response": {}, "status": "ok"}, ref)
            await self._send(ws, topic, "phx_close", {}, message.get("join_ref"))
        elif event == "access_token":
            pass  # the real server never replies

    async def _subscribe_postgres(self, subscription: Subscription) -> None:
        """The outcome of subscribing a channel's bindings (push_system_message in
        lib/realtime_web/channels/realtime_channel.ex): "Subscribed to PostgreSQL", or the error."""
        if subscription not in self.subscriptions:
            return  # left or replaced meanwhile
        subscription.subscribed = not self.postgres_changes_failing
        message = "Subscribed to PostgreSQL" if subscription.subscribed else subscription.bindings[0].subscribe_error()
        await self._send(subscription.ws, subscription.topic, "system", {
            "channel": subscription.topic.removeprefix("realtime:"), "extension": "postgres_changes",
            "message": message, "status": "ok" if subscription.subscribed else "error"}, None)
        if subscription.subscribed and self.postgres_changes_flapping is not None:
            self._tasks.add(task := asyncio.create_task(self._fail_later(subscription, self.postgres_changes_flapping)))
            task.add_done_callback(self._tasks.discard)

    async def _fail_later(self, subscription: Subscription, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if subscription in self.subscriptions and not subscription.ws.closed:
            subscription.subscribed = False
            with contextlib.suppress(ConnectionError):
                await self._send(subscription.ws, subscription.topic, "system", {
                    "channel": subscription.topic.removeprefix("realtime:"), "extension": "postgres_changes",
                    "message": subscription.bindings[0].subscribe_error(), "status": "error"}, None)

    async def _listen_changes(self) -> None:
        while True:
            try:
                # Notifications on one connection, row lookups on another (a connection that is
                # iterating notifies() cannot run queries).
                async with await psycopg.AsyncConnection.connect(self.db_url, autocommit=True) as listener, \
                        await psycopg.AsyncConnection.connect(self.db_url, autocommit=True) as conn:
                    await listener.execute("listen realtime_emulator")
                    async for notify in listener.notifies():
                        await self._deliver(conn, json.loads(notify.payload))
            except psycopg.OperationalError:
                await asyncio.sleep(0.2)

    async def _deliver(self, conn: psycopg.AsyncConnection, change: dict[str, Any]) -> None:
        schema, table, kind = change["schema"], change["table"], change["type"]
        record = change.get("record")
        if record is None:  # too large for a notification
            row = await (await conn.execute(
                sql.SQL("select to_jsonb(t) from {}.{} t where id = %s").format(sql.Identifier(schema), sql.Identifier(table)),
                (change["id"],))).fetchone()
            if row is None:
                return
            record = row[0]
        targets = [(s, ids) for s in self.subscriptions if s.subscribed and s.ws not in self.stalled
                   and (ids := [b.id for b in s.bindings if b.matches(schema, table, kind, record)])]
        if not targets:
            return
        columns = await (await conn.execute(
            """select a.attname, t.typname from pg_attribute a join pg_type t on t.oid = a.atttypid
                where a.attrelid = format('%%I.%%I', %s::text, %s::text)::regclass and a.attnum > 0 and not a.attisdropped
                order by a.attnum""", (schema, table))).fetchall()
        # Realtime's NewRecord / UpdatedRecord structs (lib/realtime/adapters/changes.ex) as Jason's
        # derived encoder writes them: the fields in the order of Map.keys, alphabetical.
        data: dict[str, Any] = {"columns": [{"name": n, "type": t} for n, t in columns],
                                "commit_timestamp": change["commit_timestamp"], "errors": None}
        if kind == "UPDATE":
            data["old_record"] = change["old_record"]
        data.update(record=record, schema=schema, table=table, type=kind)
        for subscription, ids in targets:
            payload = {"data": data, "ids": ids}
            await self._send(subscription.ws, subscription.topic, "postgres_changes", payload, None)
            self.changes.append({"topic": subscription.topic, **payload})
            self.delivered += 1
