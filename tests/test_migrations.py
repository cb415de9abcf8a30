"""The migrations apply unchanged on a fresh Supabase-like database, again from scratch, and not
twice on the same database."""

from __future__ import annotations

import psycopg

from tests.conftest import PROJECT_DIR
from worker import migrations
from worker.localdb import LocalDatabase

SCHEMA_FINGERPRINT = """
select string_agg(format('%s.%s.%s:%s', table_schema, table_name, column_name, data_type), ','
                  order by table_name, column_name)  -- (`order by 1` in an aggregate orders by a constant)
  from information_schema.columns where table_schema = 'public'
"""


def test_migrations_apply_twice_from_scratch(cluster: LocalDatabase) -> None:
    expected = [m.version for m in migrations.list_migrations(PROJECT_DIR)]
    assert expected, "no migrations found"
    fingerprints = []
    for _ in range(2):
        url = cluster.create_database("scratch")  # drops the previous one
        assert migrations.prepare(url, project_dir=PROJECT_DIR) == expected
        with psycopg.connect(url) as conn:
            recorded = [r[0] for r in conn.execute(
                "select version from supabase_migrations.schema_migrations order by version")]
            fingerprints.append(conn.execute(SCHEMA_FINGERPRINT).fetchone()[0])
        assert recorded == expected
    assert fingerprints[0] == fingerprints[1]
    assert "assistant_messages.reply_to" in fingerprints[0]


def test_prepare_again_applies_nothing(db_url: str) -> None:
    assert migrations.prepare(db_url, project_dir=PROJECT_DIR) == []


def test_migration_files_are_named_for_the_supabase_cli() -> None:
    for migration in migrations.list_migrations(PROJECT_DIR):
        assert migrations.MIGRATION_NAME.match(migration.path.name)
        text = migration.sql().lower()
        # Only what a hosted Supabase database has: no superuser-only statements.
        for forbidden in ("create role", "alter system", "create schema auth", "uuid_generate_v4"):
            assert forbidden not in text, f"{migration.path.name} uses {forbidden!r}"


def test_bootstrap_looks_like_supabase(conn: psycopg.Connection) -> None:
    roles = dict(conn.execute(
        "select rolname, rolbypassrls from pg_roles where rolname in ('anon','authenticated','service_role','authenticator')"))
    assert roles == {"anon": False, "authenticated": False, "service_role": True, "authenticator": False}
    members = {r[0] for r in conn.execute(
        "select r.rolname from pg_auth_members m join pg_roles r on r.oid = m.roleid"
        " join pg_roles u on u.oid = m.member where u.rolname = 'authenticator'")}
    assert {"anon", "authenticated", "service_role"} <= members
    with conn.transaction(force_rollback=True):
        conn.execute("""select set_config('request.jwt.claims', '{"sub":"7d1f6f4e-2a4b-4b8e-9d55-0c7a1f0e9b11","role":"authenticated","is_anonymous":true}', true)""")
        uid, role, jwt = conn.execute("select auth.uid()::text, auth.role(), auth.jwt() ->> 'is_anonymous'").fetchone()
    assert (uid, role, jwt) == ("7d1f6f4e-2a4b-4b8e-9d55-0c7a1f0e9b11", "authenticated", "true")
    assert conn.execute("select auth.uid()").fetchone()[0] is None
    assert conn.execute("select count(*) from pg_namespace where nspname = 'extensions'").fetchone()[0] == 1
    assert conn.execute("select count(*) from pg_available_extensions where name = 'vector'").fetchone()[0] == 1


def test_clients_watch_threads_and_messages_over_realtime(conn: psycopg.Connection) -> None:
    published = {r[0] for r in conn.execute(
        "select tablename from pg_publication_tables where pubname = 'supabase_realtime'")}
    assert {"assistant_threads", "assistant_messages"} <= published
    assert "assistant_runs" not in published


def test_the_account_lock_migration_stops_with_a_reason_when_its_role_cannot_lock_auth_users(conn) -> None:
    """20261123002100 creates a SECURITY DEFINER function that locks rows of auth.users as the
    role applying it: it first checks that this role may (SELECT and UPDATE on auth.users, row
    level security bypassed: as Supabase's `postgres`) and stops with the reason otherwise, rather
    than leave every worker write to fail with "permission denied". Owned by such a role (not a
    superuser) and called as service_role, the function locks; owned by one row level security
    hides the accounts from, a claim's call raises instead of skipping them. All in one
    transaction, rolled back (roles too)."""
    import re

    text = (PROJECT_DIR / "supabase" / "migrations" / "20261123002100_writers_lock_the_account_first.sql").read_text()
    [check] = re.findall(r"^do \$\$.*?^\$\$;", text, flags=re.S | re.M)
    user = conn.execute("insert into auth.users (id, email) values (gen_random_uuid(), 'lock@example.com')"
                        " returning id").fetchone()[0]

    def refused(role: str, says: str, hint: str) -> None:
        with conn.transaction():
            conn.execute("savepoint check_it")
            conn.execute(f"set local role {role}")
            try:
                conn.execute(check)
            except psycopg.errors.InsufficientPrivilege as exc:
                assert role in str(exc) and says in str(exc), exc
                assert hint in (exc.diag.message_hint or "")
            else:
                raise AssertionError(f"the check let {role} through")
            conn.execute("rollback to savepoint check_it")

    with conn.transaction(force_rollback=True):
        conn.execute("create role migrator_without_auth nologin; create role migrator_with_auth nologin;"
                     " grant usage on schema auth to migrator_without_auth, migrator_with_auth;"
                     " grant select, update on auth.users to migrator_with_auth")
        with conn.transaction():
            conn.execute("set local role migrator_with_auth")
            conn.execute(check)  # passes
            conn.execute("reset role")  # (a released savepoint keeps its settings)
        refused("migrator_without_auth", "needs SELECT and UPDATE on auth.users", "apply the migrations as postgres")
        # As on a hosted project: the function owned by that role, called by the worker's role.
        conn.execute("alter function assistant_lock_users(uuid[], boolean) owner to migrator_with_auth")
        with conn.transaction():
            conn.execute("set local role service_role")
            assert conn.execute("select assistant_lock_users(array[%s]::uuid[], false)", (user,)).fetchone()[0] == [user]
            conn.execute("reset role")
        conn.execute("alter table auth.users enable row level security")
        refused("migrator_with_auth", "does not bypass it", "a role with BYPASSRLS")
        for wait in (False, True):  # a claim's call, and a writer's
            with conn.transaction():
                conn.execute("savepoint call_it")
                conn.execute("set local role service_role")
                try:
                    conn.execute("select assistant_lock_users(array[%s]::uuid[], %s)", (user, wait))
                except psycopg.errors.InsufficientPrivilege as exc:
                    assert "row level security on auth.users hides them from migrator_with_auth" in str(exc)
                    assert "BYPASSRLS" in (exc.diag.message_hint or "")
                else:
                    raise AssertionError(f"an account the owner cannot see was passed over (wait={wait})")
                conn.execute("rollback to savepoint call_it")
