"""`python -m worker chat`: a terminal client that behaves like an app. It signs in as a local user
(creating it in auth.users on first use, as Supabase Auth would on sign-up), then writes each
line as a user message through RLS, exactly as PostgREST runs a request for that user, and
prints the assistant's reply when it is committed. `/image URL text` attaches an image."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

import psycopg

REPLY_TIMEOUT_SECONDS = 300


async def as_user(conn: psycopg.AsyncConnection, user_id: uuid.UUID, sql: str, params: tuple = ()) -> list[Any]:
    """One request as a signed-in user, run the way PostgREST runs it."""
    async with conn.transaction():
        await conn.execute("set local role authenticated")
        await conn.execute("select set_config('request.jwt.claims', %s, true)",
                           (json.dumps({"sub": str(user_id), "role": "authenticated"}),))
        cursor = await conn.execute(sql, params)
        return await cursor.fetchall() if cursor.description else []


async def sign_in(conn: psycopg.AsyncConnection, email: str) -> uuid.UUID:
    row = await (await conn.execute("select id from auth.users where email = %s", (email,))).fetchone()
    if row:
        return row[0]
    user_id = uuid.uuid4()
    await conn.execute("insert into auth.users (id, aud, role, email) values (%s, 'authenticated', 'authenticated', %s)",
                       (user_id, email))
    return user_id


async def wait_for_reply(conn: psycopg.AsyncConnection, user_id: uuid.UUID, message_id: uuid.UUID) -> str | None:
    delay = 0.05
    for _ in range(int(REPLY_TIMEOUT_SECONDS / 0.05)):
        rows = await as_user(conn, user_id, "select content from assistant_messages where reply_to = %s", (message_id,))
        if rows:
            return rows[0][0]
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    return None


async def chat(url: str, email: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        user_id = await sign_in(conn, email)
        [(thread_id,)] = await as_user(conn, user_id,
                                        "insert into assistant_threads (title) values ('Terminal chat') returning id", ())
        print(f"signed in as {email}; new thread {thread_id}. Type a message, /image URL text, or Ctrl-D to quit.")
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return 0
            line = line.strip()
            if not line:
                continue
            image = None
            if line.startswith("/image "):
                _, image, *rest = line.split(" ", 2)
                line = rest[0] if rest else "What is in this picture?"
            try:
                [(message_id,)] = await as_user(
                    conn, user_id,
                    "insert into assistant_messages (thread_id, role, content, image_url) values (%s, 'user', %s, %s) returning id",
                    (thread_id, line, image))
            except psycopg.Error as error:
                print(f"refused: {error.diag.message_primary}")
                continue
            reply = await wait_for_reply(conn, user_id, message_id)
            print(f"assistant> {reply}" if reply else "assistant> (no reply yet; is the worker running?)")
