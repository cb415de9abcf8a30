"""Acting on the database exactly as PostgREST does for one request: a transaction in which the
role is switched with `set local role` and the JWT claims are published as `request.jwt.claims`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg


@dataclass(frozen=True)
class Actor:
    """Who a request is made as: a role and, for signed-in users, their id."""

    name: str
    role: str
    user_id: uuid.UUID | None = None
    is_anonymous: bool = False

    def claims(self) -> dict[str, Any]:
        claims: dict[str, Any] = {"role": self.role, "iss": "supabase", "aud": self.role}
        if self.user_id is not None:
            claims.update(sub=str(self.user_id), aud="authenticated", is_anonymous=self.is_anonymous)
        return claims


def anon() -> Actor:
    return Actor("anon", "anon")


def service() -> Actor:
    return Actor("service", "service_role")


def user(name: str, user_id: uuid.UUID, *, is_anonymous: bool = False) -> Actor:
    return Actor(name, "authenticated", user_id, is_anonymous)


@contextmanager
def request(conn: psycopg.Connection, actor: Actor, *, commit: bool = False) -> Iterator[psycopg.Cursor]:
    """One PostgREST request as `actor`. Rolled back unless `commit`; a failed statement aborts it."""
    with conn.transaction(force_rollback=not commit):
        conn.execute(f'set local role "{actor.role}"')
        conn.execute(
            "select set_config('request.jwt.claims', %s, true), set_config('request.method', 'POST', true)",
            (json.dumps(actor.claims()),),
        )
        yield conn.cursor()


def create_user(conn: psycopg.Connection, *, email: str | None = None, is_anonymous: bool = False,
                plan: str | None = "unlimited") -> uuid.UUID:
    """A row in auth.users, as Supabase Auth would create on sign-up (or anonymous sign-in).
    `plan` moves the user from the plan the sign-up trigger chose (None: keep that one)."""
    user_id = uuid.uuid4()
    conn.execute(
        "insert into auth.users (id, aud, role, email, is_anonymous) values (%s, 'authenticated', 'authenticated', %s, %s)",
        (user_id, email, is_anonymous),
    )
    if plan is not None:
        conn.execute("update user_ai_settings set plan_id = %s where user_id = %s", (plan, user_id))
    return user_id
