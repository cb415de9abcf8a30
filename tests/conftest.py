"""Test fixtures: one embedded PostgreSQL cluster per test session, a migrated template database,
and fresh copies of it for the tests that write."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import hypothesis
import psycopg
import pytest
import respx

from tests import postgrest
from tests.postgrest import create_user, request
from worker import attachments, migrations
from worker.localdb import LocalDatabase
from worker.simulator import ReplicateSimulator

PROJECT_DIR = Path(__file__).resolve().parent.parent

# CI runs the property tests on a fixed sequence of examples, so a run is reproducible; a
# developer's run explores new ones each time.
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")
TEMPLATE = "migrated_template"
_names = itertools.count()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDatabase]:
    db = LocalDatabase(tmp_path_factory.mktemp("cluster"), fast=True)
    db.start()
    yield db
    db.destroy()


@pytest.fixture(scope="session")
def template_db(cluster: LocalDatabase) -> str:
    url = cluster.create_database(TEMPLATE)
    migrations.prepare(url, project_dir=PROJECT_DIR, seed=False)  # the demo data has its own test
    with psycopg.connect(url, autocommit=True) as conn:
        # Test data, not schema: a plan without limits, for tests about something other than limits.
        conn.execute("insert into ai_plans (id, name) values ('unlimited', 'Unlimited (tests)')")
    return TEMPLATE


@pytest.fixture
def db_url(cluster: LocalDatabase, template_db: str) -> str:
    """A fresh, fully migrated database for one test."""
    return cluster.create_database(f"test_{next(_names)}", template=template_db)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """A superuser connection in autocommit mode (the test opens transactions itself)."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def owner(conn: psycopg.Connection) -> uuid.UUID:
    """A signed-up user."""
    return create_user(conn, email="owner@example.com")


@pytest.fixture
def thread(conn: psycopg.Connection, owner: uuid.UUID) -> uuid.UUID:
    """A thread of `owner`."""
    return conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (owner,)).fetchone()[0]


def user_message(conn: psycopg.Connection, owner: uuid.UUID, thread: uuid.UUID, content: str = "hello") -> uuid.UUID:
    """`owner` writes a message into `thread` through RLS, as an app does."""
    with request(conn, postgrest.user("owner", owner), commit=True) as cur:
        return cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'user', %s) returning id",
                           (thread, content)).fetchone()[0]


@pytest.fixture
async def simulator() -> AsyncIterator[ReplicateSimulator]:
    """The Replicate simulator on loopback, accepting the token `r8_test`."""
    sim = ReplicateSimulator(latency=0.05, token="r8_test")
    await sim.start()
    yield sim
    await sim.stop()


@pytest.fixture
def public_images(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    """Image hosts `*.example` as the worker would see public ones: resolved to a public address
    and answering HEAD with an image. Loopback traffic (simulator, emulators) passes through."""

    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34"] if host.endswith(".example") else await real_resolve(host, port)

    real_resolve = attachments.resolve_host
    monkeypatch.setattr(attachments, "resolve_host", resolve)
    with respx.mock(assert_all_called=False, using="httpx") as router:  # any transport, aiohttp too
        router.route(host="127.0.0.1").pass_through()
        # The check connects to the address it resolved, with the host name in Host and SNI.
        router.head(host="93.184.216.34").respond(
            200, headers={"content-type": "image/jpeg", "content-length": "48213"})
        yield router
