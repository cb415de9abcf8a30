"""Rollback scripts (supabase/rollbacks/, apart from the migrations): one per migration, and
rolling everything back leaves nothing of ours behind, after which the migrations apply again."""

from __future__ import annotations

import psycopg

from tests.conftest import PROJECT_DIR
from worker import migrations
from worker.localdb import LocalDatabase

ROLLBACKS = PROJECT_DIR / "supabase" / "rollbacks"

LEFTOVERS = """
select 'relation ' || relname from pg_class where relnamespace = 'public'::regnamespace
union all select 'function ' || proname from pg_proc where pronamespace = 'public'::regnamespace
union all select 'published ' || tablename from pg_publication_tables where pubname = 'supabase_realtime'
union all select 'trigger ' || tgname from pg_trigger where tgrelid = 'auth.users'::regclass
union all select 'bucket ' || id from storage.buckets
union all select 'policy ' || policyname from pg_policies where schemaname in ('public', 'storage', 'realtime')
union all select 'migration ' || version from supabase_migrations.schema_migrations
"""


def test_every_migration_has_a_rollback() -> None:
    expected = {f"{m.version}_{m.name}.down.sql" for m in migrations.list_migrations(PROJECT_DIR)}
    assert {p.name for p in ROLLBACKS.glob("*.sql")} == expected


def test_rolling_everything_back_leaves_nothing_and_the_migrations_apply_again(cluster: LocalDatabase) -> None:
    url = cluster.create_database("rollbacks")
    applied = migrations.prepare(url, project_dir=PROJECT_DIR)
    with psycopg.connect(url, autocommit=True) as conn:
        # Some data in every layer, as a used database has.
        user = conn.execute("insert into auth.users (id, email) values (gen_random_uuid(), 'a@example.com') returning id").fetchone()[0]
        thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
        conn.execute("insert into assistant_messages (thread_id, user_id, role, content) values (%s, %s, 'user', 'hi')",
                     (thread, user))
        for version in reversed(applied):
            [script] = ROLLBACKS.glob(f"{version}_*.down.sql")
            conn.execute(script.read_text())
            remaining = {r[0] for r in conn.execute("select version from supabase_migrations.schema_migrations")}
            assert version not in remaining
        assert [r[0] for r in conn.execute(LEFTOVERS)] == []
    assert migrations.prepare(url, project_dir=PROJECT_DIR, seed=False) == applied


def test_each_rollback_is_undone_by_its_migration(cluster: LocalDatabase) -> None:
    """Down to each migration in turn: roll back, migrate up again, roll back again."""
    url = cluster.create_database("rollback_steps")
    applied = migrations.prepare(url, project_dir=PROJECT_DIR, seed=False)
    with psycopg.connect(url, autocommit=True) as conn:

        def roll_back(versions: list[str]) -> None:
            for version in reversed(versions):
                [script] = ROLLBACKS.glob(f"{version}_*.down.sql")
                conn.execute(script.read_text())

        for k in reversed(range(len(applied))):
            roll_back([applied[k]])
            assert migrations.prepare(url, project_dir=PROJECT_DIR, bootstrap=False, seed=False) == applied[k:]
            roll_back(applied[k:])
