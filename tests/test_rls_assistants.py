"""RLS for the assistants, knowledge, attachments, follow-ups and actions tables: for each table,
select / insert / update / delete as the owner, another signed-in user, anon and the service role."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import psycopg.errors
import pytest

from tests import postgrest
from tests.postgrest import create_user, request
from worker.localdb import LocalDatabase

VECTOR = "[" + ",".join(["0.1"] * 768) + "]"


@dataclass
class World:
    conn: psycopg.Connection
    ids: dict[str, uuid.UUID]

    def actor(self, name: str) -> postgrest.Actor:
        return {"owner": postgrest.user("owner", self.ids["owner"]), "other": postgrest.user("other", self.ids["other"]),
                "anon": postgrest.anon(), "service": postgrest.service()}[name]


@pytest.fixture(scope="module")
def world(cluster: LocalDatabase, template_db: str) -> Iterator[World]:
    url = cluster.create_database("rls_assistants_world", template=template_db)
    with psycopg.connect(url, autocommit=True) as conn:
        ids: dict[str, uuid.UUID] = {"owner": create_user(conn), "other": create_user(conn)}
        q = lambda sql, *p: conn.execute(sql, p).fetchone()[0]  # noqa: E731
        ids["assistant"] = q("select id from assistants where is_default")
        ids["question"] = q("insert into assistant_guided_questions (assistant_id, question) values (%s, 'Hi?') returning id",
                            ids["assistant"])
        ids["thread"] = q("insert into assistant_threads (user_id) values (%s) returning id", ids["owner"])
        ids["message"] = q("insert into assistant_messages (thread_id, role, content) values (%s, 'assistant', 'a') returning id",
                           ids["thread"])
        conn.execute("insert into ai_profiles (user_id) values (%s)", (ids["owner"],))
        ids["document"] = q("insert into kb_documents (source, title, content_hash) values ('a.md', 'A', 'h') returning id")
        ids["chunk"] = q("insert into kb_chunks (document_id, chunk_index, content, embedding) values (%s, 0, 'c', %s)"
                         " returning id", ids["document"], VECTOR)
        ids["search"] = q("insert into kb_searches (query, result_count) values ('q', 1) returning id")
        ids["file"] = q("insert into assistant_files (user_id, thread_id, storage_path, filename, mime_type, size_bytes)"
                        " values (%s, %s, %s, 'a.png', 'image/png', 10) returning id",
                        ids["owner"], ids["thread"], f"{ids['owner']}/a.png")
        ids["follow_up"] = q("insert into assistant_follow_ups (user_id, thread_id, message_id, position, suggestion)"
                             " values (%s, %s, %s, 1, 'More?') returning id", ids["owner"], ids["thread"], ids["message"])
        conn.execute("insert into assistant_action_types (name) values ('noop')")
        ids["action"] = q("insert into assistant_action_requests (user_id, thread_id, action_type) values (%s, %s, 'noop')"
                          " returning id", ids["owner"], ids["thread"])
        yield World(conn, ids)


D = "denied"
CASES: list[tuple[str, str, tuple]] = [
    # table, statement, (owner, other, anon, service)
    ("assistants", "select * from assistants where id = %(assistant)s", (1, 1, D, 1)),
    ("assistants", "insert into assistants (slug, name) values ('mine', 'Mine')", (D, D, D, 1)),
    ("assistants", "update assistants set instructions = 'x' where id = %(assistant)s", (D, D, D, 1)),
    ("assistants", "delete from assistants where slug = 'nothing'", (D, D, D, 0)),
    ("assistant_guided_questions", "select * from assistant_guided_questions where id = %(question)s", (1, 1, D, 1)),
    ("assistant_guided_questions", "insert into assistant_guided_questions (assistant_id, question) values (%(assistant)s, 'q')",
     (D, D, D, 1)),
    ("assistant_guided_questions", "update assistant_guided_questions set priority = 9 where id = %(question)s", (D, D, D, 1)),
    ("assistant_guided_questions", "delete from assistant_guided_questions where id = %(question)s", (D, D, D, 1)),
    ("ai_profiles", "select * from ai_profiles where user_id = %(owner)s", (1, 0, D, 1)),
    ("ai_profiles", "insert into ai_profiles (user_id) values (%(other)s)", (D, 1, D, 1)),
    ("ai_profiles", "update ai_profiles set experience_level = 'x' where user_id = %(owner)s", (1, 0, D, 1)),
    ("ai_profiles", "update ai_profiles set user_id = %(other)s where user_id = %(owner)s", (D, 0, D, 1)),
    ("ai_profiles", "delete from ai_profiles where user_id = %(owner)s", (1, 0, D, 1)),
    ("kb_documents", "select * from kb_documents where id = %(document)s", (D, D, D, 1)),
    ("kb_documents", "insert into kb_documents (source, title, content_hash) values ('b.md', 'B', 'h')", (D, D, D, 1)),
    ("kb_documents", "update kb_documents set title = 'x' where id = %(document)s", (D, D, D, 1)),
    ("kb_documents", "delete from kb_documents where id = %(document)s", (D, D, D, 1)),
    ("kb_chunks", "select * from kb_chunks where id = %(chunk)s", (D, D, D, 1)),
    ("kb_chunks", "insert into kb_chunks (document_id, chunk_index, content, embedding) values (%(document)s, 1, 'c', %(vector)s)",
     (D, D, D, 1)),
    ("kb_chunks", "update kb_chunks set content = 'x' where id = %(chunk)s", (D, D, D, 1)),
    ("kb_chunks", "delete from kb_chunks where id = %(chunk)s", (D, D, D, 1)),
    ("kb_searches", "select * from kb_searches where id = %(search)s", (D, D, D, 1)),
    ("kb_searches", "insert into kb_searches (query, result_count) values ('q', 0)", (D, D, D, 1)),
    ("kb_searches", "update kb_searches set query = 'x' where id = %(search)s", (D, D, D, 1)),
    ("kb_searches", "delete from kb_searches where id = %(search)s", (D, D, D, 1)),
    ("assistant_files", "select * from assistant_files where id = %(file)s", (1, 0, D, 1)),
    ("assistant_files", "insert into assistant_files (thread_id, storage_path, filename, mime_type, size_bytes)"
                        " values (%(thread)s, %(owner)s || '/b.png', 'b.png', 'image/png', 10)", (1, D, D, "check")),
    ("assistant_files", "update assistant_files set size_bytes = 1 where id = %(file)s", (D, D, D, 1)),
    ("assistant_files", "delete from assistant_files where id = %(file)s", (1, 0, D, 1)),
    ("assistant_follow_ups", "select * from assistant_follow_ups where id = %(follow_up)s", (1, 0, D, 1)),
    ("assistant_follow_ups", "insert into assistant_follow_ups (user_id, thread_id, message_id, position, suggestion)"
                             " values (%(owner)s, %(thread)s, %(message)s, 2, 'x')", (D, D, D, 1)),
    ("assistant_follow_ups", "update assistant_follow_ups set used_at = now() where id = %(follow_up)s", (1, 0, D, 1)),
    ("assistant_follow_ups", "delete from assistant_follow_ups where id = %(follow_up)s", (D, D, D, 1)),
    ("assistant_action_types", "select * from assistant_action_types where name = 'noop'", (1, 1, D, 1)),
    ("assistant_action_types", "insert into assistant_action_types (name) values ('mine')", (D, D, D, 1)),
    ("assistant_action_types", "update assistant_action_types set description = 'x' where name = 'noop'", (D, D, D, 1)),
    ("assistant_action_types", "delete from assistant_action_types where name = 'nothing'", (D, D, D, 0)),
    ("assistant_action_requests", "select * from assistant_action_requests where id = %(action)s", (1, 0, D, 1)),
    ("assistant_action_requests", "insert into assistant_action_requests (user_id, thread_id, action_type)"
                                  " values (%(owner)s, %(thread)s, 'noop')", (D, D, D, 1)),
    ("assistant_action_requests", "update assistant_action_requests set status = 'approved' where id = %(action)s",
     (1, 0, D, 1)),
    ("assistant_action_requests", "delete from assistant_action_requests where id = %(action)s", (D, D, D, 1)),
]
TABLES_COVERED = {table for table, _, _ in CASES}


@pytest.mark.parametrize(("table", "sql", "expected"), CASES, ids=[f"{c[0]}-{c[1].split()[0]}" for c in CASES])
@pytest.mark.parametrize("actor", ["owner", "other", "anon", "service"])
def test_rls(world: World, table: str, sql: str, expected: tuple, actor: str) -> None:
    outcome = expected[("owner", "other", "anon", "service").index(actor)]
    params = {**world.ids, "vector": VECTOR}
    with request(world.conn, world.actor(actor)) as cur:
        if outcome == D:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                cur.execute(sql, params)
            return
        if outcome == "check":  # allowed by RLS, refused by a check: the service role's row has no owner folder
            with pytest.raises((psycopg.errors.CheckViolation, psycopg.errors.NotNullViolation)):
                cur.execute(sql, params)
            return
        cur.execute(sql, params)
        count = len(cur.fetchall()) if sql.startswith("select") else cur.rowcount
    assert count == outcome
