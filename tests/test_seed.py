"""The demo seed: realistic data on a local database, and a refusal anywhere else."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import PROJECT_DIR
from worker import migrations
from worker.localdb import LocalDatabase

SEED = (PROJECT_DIR / "supabase" / "seed.sql").read_text()


def test_the_seed_fills_a_fresh_local_database(cluster: LocalDatabase) -> None:
    url = cluster.create_database("seeded")
    migrations.prepare(url, project_dir=PROJECT_DIR)
    with psycopg.connect(url) as conn:
        plans = dict(conn.execute("select u.email, s.plan_id from auth.users u join user_ai_settings s on s.user_id = u.id"
                                  " where u.email is not null"))
        assert plans == {"alice@example.com": "free", "bob@example.com": "premium", "demo@example.com": "free"}
        assert conn.execute("select plan_id from user_ai_settings s join auth.users u on u.id = s.user_id"
                            " where u.is_anonymous").fetchone()[0] == "guest"
        assert {r[0] for r in conn.execute("select slug from assistants")} == {"default", "stylist", "helpdesk"}
        assert conn.execute("select count(*) from assistant_runs where status in ('queued', 'in_progress')").fetchone()[0] == 0
        replies = conn.execute("select count(*) from assistant_messages where reply_to is not null").fetchone()[0]
        assert replies == 4
        models = {r[0]: r[1] for r in conn.execute("select model, sum(replies) from ai_usage_daily group by model")}
        assert models == {"meta/meta-llama-3-8b-instruct": 3, "yorickvp/llava-13b": 1}


@pytest.mark.parametrize(("address", "ssl", "local"), [
    (None, "off", True), ("127.0.0.1", "off", True), ("::1", "off", True), ("172.18.0.3", "off", True),
    ("10.4.0.2", "off", True), ("35.180.10.7", "off", False), ("2600:1f18::1", "off", False),
    ("127.0.0.1", "on", False), (None, "on", False),
])
def test_what_counts_as_local(conn: psycopg.Connection, address: str | None, ssl: str, local: bool) -> None:
    definition = SEED[SEED.index("create or replace function pg_temp.is_local_database"):SEED.index("do $$")]
    conn.execute(definition)
    assert conn.execute("select pg_temp.is_local_database(%s::inet, %s)", (address, ssl)).fetchone()[0] is local


def test_the_seed_refuses_a_server_that_is_not_local(conn: psycopg.Connection) -> None:
    guard = SEED[SEED.index("do $$"):SEED.index("$$;", SEED.index("do $$")) + 3]
    conn.execute("create function pg_temp.is_local_database(inet, text) returns boolean language sql as 'select false'")
    with pytest.raises(psycopg.errors.RaiseException, match="demo data for local databases only; refusing to run"):
        conn.execute(guard)
