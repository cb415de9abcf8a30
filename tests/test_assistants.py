"""Assistants, guided questions, personalisation, follow-ups and action requests."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import psycopg.errors
import pytest

from tests import postgrest
from tests.pipeline_helpers import (
    as_user,
    finished_runs,
    new_user_thread,
    query,
    running_worker,
    say,
    wait_until,
    worker_settings,
)
from tests.postgrest import create_user, request
from worker.simulator import ReplicateSimulator


async def make_assistant(db_url: str, **columns: Any) -> dict:
    names = ", ".join(columns)
    marks = ", ".join(f"%({k})s" for k in columns)
    [row] = await query(db_url, f"insert into assistants ({names}) values ({marks}) returning *", columns)
    return row


async def thread_with(db_url: str, user, assistant_id) -> Any:
    [row] = await as_user(db_url, user, "insert into assistant_threads (assistant_id) values (%s) returning id",
                          (assistant_id,))
    return row["id"]


def last_chat_input(simulator: ReplicateSimulator) -> dict:
    return [c for c in simulator.creates if "prompt" in c.body["input"]][-1].body["input"]


async def test_the_threads_assistant_decides_instructions_model_and_sampling(db_url, simulator) -> None:
    assistant = await make_assistant(db_url, slug="stylist", name="Stylist", instructions="You are a fashion stylist.",
                                     chat_model="meta/meta-llama-3-70b-instruct", temperature=0.2, max_output_tokens=200)
    user, _ = await new_user_thread(db_url)
    thread = await thread_with(db_url, user, assistant["id"])
    async with running_worker(worker_settings(simulator.base_url), db_url):
        message = await say(db_url, user, thread, "Navy blazer: what shoes?")
        await finished_runs(db_url, 1)
    [create] = simulator.creates
    assert create.path == "/v1/models/meta/meta-llama-3-70b-instruct/predictions"
    sent = create.body["input"]
    assert sent["prompt"].startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a fashion stylist.<|eot_id|>")
    assert (sent["temperature"], sent["max_tokens"]) == (0.2, 200)
    [reply] = await query(db_url, "select model from assistant_messages where reply_to = %s", (message,))
    assert reply["model"] == "meta/meta-llama-3-70b-instruct"


async def test_a_new_thread_gets_the_default_assistant(db_url) -> None:
    user, thread = await new_user_thread(db_url)
    [row] = await query(db_url, "select a.slug from assistant_threads t join assistants a on a.id = t.assistant_id"
                                " where t.id = %s", (thread,))
    assert row["slug"] == "default"


def test_assistants_offered_and_their_guided_questions(conn) -> None:
    members = conn.execute("insert into assistants (slug, name, offered_to) values ('pro', 'Pro', 'members') returning id").fetchone()[0]
    hidden = conn.execute("insert into assistants (slug, name, is_active) values ('old', 'Old', false) returning id").fetchone()[0]
    default = conn.execute("select id from assistants where is_default").fetchone()[0]
    for question, priority in [("Second", 1), ("First", 5), ("Hidden", 9)]:
        conn.execute("insert into assistant_guided_questions (assistant_id, question, priority, is_active) values (%s, %s, %s, %s)",
                     (default, question, priority, question != "Hidden"))
    member, guest = create_user(conn), create_user(conn, is_anonymous=True)
    with request(conn, postgrest.user("m", member)) as cur:
        assert {r[0] for r in cur.execute("select slug from assistants")} == {"default", "pro"}
        assert [r[0] for r in cur.execute("select question from assistant_guided_questions order by priority desc")] == ["First", "Second"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("update assistants set instructions = 'obey me' where slug = 'default'")
    with request(conn, postgrest.user("g", guest, is_anonymous=True)) as cur:
        assert {r[0] for r in cur.execute("select slug from assistants")} == {"default"}
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            cur.execute("insert into assistant_threads (assistant_id) values (%s)", (members,))
    with request(conn, postgrest.user("m", member)) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute("insert into assistant_threads (assistant_id) values (%s)", (hidden,))
    with request(conn, postgrest.anon()) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege):
        cur.execute("select * from assistants")


def test_a_thread_moves_only_to_an_assistant_the_user_is_offered(conn) -> None:
    q = lambda sql, *p: conn.execute(sql, p).fetchone()[0]  # noqa: E731
    members = q("insert into assistants (slug, name, offered_to) values ('pro2', 'Pro', 'members') returning id")
    hidden = q("insert into assistants (slug, name, is_active) values ('old2', 'Old', false) returning id")
    retired = q("insert into assistants (slug, name) values ('retired', 'Retired') returning id")
    member, guest = create_user(conn), create_user(conn, is_anonymous=True)
    guest_thread = q("insert into assistant_threads (user_id) values (%s) returning id", guest)
    member_thread = q("insert into assistant_threads (user_id, assistant_id) values (%s, %s) returning id", member, retired)
    move = "update assistant_threads set assistant_id = %s where id = %s returning assistant_id"
    as_guest, as_member = postgrest.user("g", guest, is_anonymous=True), postgrest.user("m", member)
    for actor, target, thread in [(as_guest, members, guest_thread), (as_guest, hidden, guest_thread),
                                  (as_member, hidden, member_thread)]:
        with request(conn, actor) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege, match="not offered to you"):
            cur.execute(move, (target, thread))
    with request(conn, as_member, commit=True) as cur:
        assert cur.execute(move, (members, member_thread)).fetchone() == (members,)
    with request(conn, as_guest, commit=True) as cur:  # no assistant means the default one
        assert cur.execute(move, (None, guest_thread)).fetchone() == (None,)
    # An assistant withdrawn after the thread began does not lock the thread: it can still be
    # renamed and archived, and moved to an offered assistant.
    conn.execute("update assistant_threads set assistant_id = %s where id = %s", (retired, member_thread))
    conn.execute("update assistants set is_active = false where id = %s", (retired,))
    with request(conn, as_member, commit=True) as cur:
        cur.execute("update assistant_threads set title = 'Old chat', archived_at = now() where id = %s", (member_thread,))
        assert cur.rowcount == 1
        assert cur.execute(move, (members, member_thread)).fetchone() == (members,)
    with request(conn, postgrest.service(), commit=True) as cur:  # the service role may
        assert cur.execute(move, (hidden, guest_thread)).fetchone() == (hidden,)


@pytest.mark.parametrize("change", ["offered_to = 'members'", "is_active = false"])
def test_the_default_assistant_stays_active_and_offered_to_everyone(conn, change: str) -> None:
    # Threads without an assistant are answered by the default one, guests' threads too.
    with pytest.raises(psycopg.errors.CheckViolation, match="assistants_default_is_active_and_offered_to_everyone"):
        conn.execute(f"update assistants set {change} where is_default")


async def test_the_users_profile_joins_the_system_prompt(db_url, simulator) -> None:
    user, thread = await new_user_thread(db_url)
    await as_user(db_url, user, "insert into ai_profiles (goals, experience_level, preferences) values (%s, %s, %s)",
                  (json.dumps(["run a marathon", "sleep better"]), "beginner", json.dumps({"units": "metric"})))
    async with running_worker(worker_settings(simulator.base_url), db_url):
        await say(db_url, user, thread, "Plan my week")
        await finished_runs(db_url, 1)
    prompt = last_chat_input(simulator)["prompt"]
    assert ("What the user told us about themselves (use it to tailor your answer):\nGoals: run a marathon; sleep better\n"
            "Experience: beginner\nPreferences: {\"units\": \"metric\"}") in prompt


async def test_a_profile_with_an_integer_beyond_64_bits_is_read_exactly(db_url, simulator) -> None:
    # jsonb keeps any number; orjson alone would read this one as a float (losing digits): jsonload falls back.
    user, thread = await new_user_thread(db_url)
    await as_user(db_url, user, "insert into ai_profiles (preferences) values (%s)",
                  ('{"lucky_number": 123456789012345678901234567890}',))
    async with running_worker(worker_settings(simulator.base_url), db_url):
        await say(db_url, user, thread, "Pick a number")
        await finished_runs(db_url, 1)
    assert 'Preferences: {"lucky_number": 123456789012345678901234567890}' in last_chat_input(simulator)["prompt"]


def test_profiles_are_bounded_and_private(conn) -> None:
    owner, other = create_user(conn), create_user(conn)
    with request(conn, postgrest.user("o", owner), commit=True) as cur:
        cur.execute("insert into ai_profiles (goals) values ('[\"a\"]')")
    with request(conn, postgrest.user("x", other)) as cur:
        assert cur.execute("select * from ai_profiles").fetchall() == []
        assert cur.execute("update ai_profiles set goals = '[]' where user_id = %s", (owner,)).rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("insert into ai_profiles (user_id) values (%s)", (owner,))
    with request(conn, postgrest.user("o", owner)) as cur:
        with pytest.raises(psycopg.errors.CheckViolation, match="ai_profiles_goals_is_array_of_at_most_20"):
            cur.execute("update ai_profiles set goals = %s", (json.dumps([str(i) for i in range(21)]),))
    with request(conn, postgrest.user("o", owner)) as cur:
        with pytest.raises(psycopg.errors.CheckViolation, match="ai_profiles_at_most_4kb"):
            cur.execute("update ai_profiles set preferences = %s", (json.dumps({f"k{i}": "v" * 50 for i in range(100)}),))


async def test_follow_ups_are_stored_and_the_user_marks_one_used(db_url, simulator) -> None:
    user, thread = await new_user_thread(db_url)
    other, _ = await new_user_thread(db_url)
    async with running_worker(worker_settings(simulator.base_url), db_url):
        message = await say(db_url, user, thread, "Tell me about linen")
        await finished_runs(db_url, 1)
    [reply] = await query(db_url, "select id, content from assistant_messages where reply_to = %s", (message,))
    assert reply["content"] == "You said: Tell me about linen"  # the suggestions are not part of the reply
    rows = await as_user(db_url, user, "select id, suggestion, used_at from assistant_follow_ups order by position")
    assert [r["suggestion"] for r in rows] == ["Can you give an example?", "What should I avoid?"]
    first = rows[0]["id"]
    assert await as_user(db_url, other, "update assistant_follow_ups set used_at = now() where id = %s returning id", (first,)) == []
    [used] = await as_user(db_url, user, "update assistant_follow_ups set used_at = '2001-01-01' where id = %s returning used_at",
                           (first,))
    assert used["used_at"].year >= 2026  # the server's clock, not the client's
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="can only be marked used"):
        await as_user(db_url, user, "update assistant_follow_ups set suggestion = 'x' where id = %s", (first,))


# -- action requests ---------------------------------------------------------------------------
def proposing(payload: dict) -> Any:
    def reply(model_input: dict) -> str:
        return ("I can remember that for you.\n<<action>> " +
                json.dumps({"type": "update_profile_preferences", "payload": payload}))

    return reply


async def actions_assistant(db_url: str) -> Any:
    return (await make_assistant(db_url, slug="coach", name="Coach", features=["actions", "personalisation"]))["id"]


async def test_an_approved_action_is_executed_with_a_tool_message(db_url, simulator) -> None:
    simulator.reply = proposing({"preferences": {"units": "imperial"}})
    user, _ = await new_user_thread(db_url)
    thread = await thread_with(db_url, user, await actions_assistant(db_url))
    async with running_worker(worker_settings(simulator.base_url), db_url):
        message = await say(db_url, user, thread, "Please use imperial units from now on")
        await finished_runs(db_url, 1)
        prompt = last_chat_input(simulator)["prompt"]
        assert "<<action>>" in prompt and "- update_profile_preferences:" in prompt
        [proposal] = await as_user(db_url, user, "select id, action_type, payload, status from assistant_action_requests")
        assert (proposal["action_type"], proposal["payload"], proposal["status"]) == \
            ("update_profile_preferences", {"preferences": {"units": "imperial"}}, "pending")
        [reply] = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
        assert reply["content"] == "I can remember that for you."
        await as_user(db_url, user, "update assistant_action_requests set status = 'approved' where id = %s", (proposal["id"],))

        async def executed() -> list:
            return await query(db_url, "select * from assistant_action_requests where status = 'executed'")

        [done] = await wait_until(executed, what="the action to run")
    assert done["result"] == {"preferences": {"units": "imperial"}} and done["executed_at"] is not None
    [profile] = await query(db_url, "select preferences from ai_profiles where user_id = %s", (user,))
    assert profile["preferences"] == {"units": "imperial"}
    [tool] = await query(db_url, "select content, metadata_json from assistant_messages where role = 'tool'")
    assert tool["content"].startswith("Action update_profile_preferences executed:")
    assert tool["metadata_json"]["action_request_id"] == str(done["id"])


async def test_a_rejected_action_never_runs_and_a_failing_one_says_why(db_url, simulator) -> None:
    simulator.reply = proposing({"preferences": {}})  # the handler refuses an empty change
    user, _ = await new_user_thread(db_url)
    thread = await thread_with(db_url, user, await actions_assistant(db_url))
    async with running_worker(worker_settings(simulator.base_url), db_url):
        for text in ("first", "second"):
            await say(db_url, user, thread, text)
        await finished_runs(db_url, 2)
        first, second = [r["id"] for r in await as_user(db_url, user, "select id from assistant_action_requests order by created_at")]
        await as_user(db_url, user, "update assistant_action_requests set status = 'rejected' where id = %s", (first,))
        await as_user(db_url, user, "update assistant_action_requests set status = 'approved' where id = %s", (second,))

        async def failed() -> list:
            return await query(db_url, "select * from assistant_action_requests where status = 'failed'")

        [failure] = await wait_until(failed, what="the failing action")
    assert failure["id"] == second and failure["error_message"] == "payload.preferences must be a non-empty object"
    [rejected] = await query(db_url, "select status, executed_at from assistant_action_requests where id = %s", (first,))
    assert rejected == {"status": "rejected", "executed_at": None}
    [tool] = await query(db_url, "select content from assistant_messages where role = 'tool'")
    assert tool["content"] == "Action update_profile_preferences failed: payload.preferences must be a non-empty object"


async def test_users_decide_only_the_status_of_their_own_pending_requests(db_url, simulator) -> None:
    simulator.reply = proposing({"preferences": {"a": 1}})
    user, _ = await new_user_thread(db_url)
    other, _ = await new_user_thread(db_url)
    thread = await thread_with(db_url, user, await actions_assistant(db_url))
    async with running_worker(worker_settings(simulator.base_url), db_url):
        await say(db_url, user, thread, "remember a")
        await finished_runs(db_url, 1)
    [proposal] = await query(db_url, "select id from assistant_action_requests")
    request_id = proposal["id"]
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only the status of an action request can be changed"):
        await as_user(db_url, user, "update assistant_action_requests set payload = '{\"preferences\": {\"admin\": true}}'"
                                    " where id = %s", (request_id,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="can be approved or rejected"):
        await as_user(db_url, user, "update assistant_action_requests set status = 'executed' where id = %s", (request_id,))
    assert await as_user(db_url, other, "update assistant_action_requests set status = 'approved' where id = %s returning id",
                         (request_id,)) == []
    await as_user(db_url, user, "update assistant_action_requests set status = 'rejected' where id = %s", (request_id,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="already rejected"):
        await as_user(db_url, user, "update assistant_action_requests set status = 'approved' where id = %s", (request_id,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await as_user(db_url, user, "insert into assistant_action_requests (user_id, thread_id, action_type) values"
                                    " (%s, %s, 'update_profile_preferences')", (user, thread))


async def test_unregistered_action_types_are_not_stored(db_url, simulator) -> None:
    simulator.reply = lambda _: 'Sure.\n<<action>> {"type": "delete_everything", "payload": {}}'
    user, _ = await new_user_thread(db_url)
    thread = await thread_with(db_url, user, await actions_assistant(db_url))
    async with running_worker(worker_settings(simulator.base_url), db_url):
        await say(db_url, user, thread, "go")
        await finished_runs(db_url, 1)
    assert await query(db_url, "select * from assistant_action_requests") == []


def test_a_withdrawn_assistant_takes_no_new_message(conn) -> None:
    """A thread whose assistant was deactivated (for everyone) or made members-only (for guests)
    takes no new message; it can be moved to an offered assistant and then goes on."""
    q = lambda sql, *p: conn.execute(sql, p).fetchone()[0]  # noqa: E731
    shop = q("insert into assistants (slug, name) values ('shop', 'Shop') returning id")
    tutor = q("insert into assistants (slug, name) values ('tutor', 'Tutor') returning id")
    member, guest = create_user(conn), create_user(conn, is_anonymous=True)
    as_guest, as_member = postgrest.user("g", guest, is_anonymous=True), postgrest.user("m", member)
    member_thread = q("insert into assistant_threads (user_id, assistant_id) values (%s, %s) returning id", member, shop)
    guest_thread = q("insert into assistant_threads (user_id, assistant_id) values (%s, %s) returning id", guest, tutor)
    ask = "insert into assistant_messages (thread_id, role, content) values (%s, 'user', 'hi') returning id"
    with request(conn, as_member, commit=True) as cur:
        cur.execute(ask, (member_thread,))
    with request(conn, as_guest, commit=True) as cur:
        cur.execute(ask, (guest_thread,))

    conn.execute("update assistants set is_active = false where id = %s", (shop,))
    conn.execute("update assistants set offered_to = 'members' where id = %s", (tutor,))
    for actor, thread in [(as_member, member_thread), (as_guest, guest_thread)]:
        with request(conn, actor) as cur, pytest.raises(psycopg.errors.InsufficientPrivilege) as refusal:
            cur.execute(ask, (thread,))
        assert f"the assistant of thread {thread} is no longer available to you" in str(refusal.value)
        assert "move the thread to another assistant" in refusal.value.diag.message_hint
    member_on_tutor = q("insert into assistant_threads (user_id, assistant_id) values (%s, %s) returning id",
                        member, tutor)
    with request(conn, as_member, commit=True) as cur:  # members-only still answers members
        cur.execute(ask, (member_on_tutor,))
        cur.execute("update assistant_threads set assistant_id = null where id = %s", (member_thread,))
        cur.execute(ask, (member_thread,))  # moved to the default: goes on
    assert q("select count(*) from assistant_messages where role = 'user'") == 4


def test_withdrawing_an_assistant_ends_the_requests_queued_for_it(conn) -> None:
    q = lambda sql, *p: conn.execute(sql, p).fetchone()[0]  # noqa: E731
    shop = q("insert into assistants (slug, name) values ('shop2', 'Shop') returning id")
    tutor = q("insert into assistants (slug, name) values ('tutor2', 'Tutor') returning id")
    member, guest = create_user(conn), create_user(conn, is_anonymous=True)
    asked: dict[str, Any] = {}
    for name, user, assistant in [("member_shop", member, shop), ("guest_shop", guest, shop),
                                  ("member_tutor", member, tutor), ("guest_tutor", guest, tutor)]:
        thread = q("insert into assistant_threads (user_id, assistant_id) values (%s, %s) returning id", user, assistant)
        with request(conn, postgrest.user(name, user, is_anonymous=user == guest), commit=True) as cur:
            asked[name] = cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'user', 'hi')"
                                      " returning id", (thread,)).fetchone()[0]
    # One of the shop's runs is being answered: it finishes, it was admitted while offered.
    conn.execute("update assistant_runs set status = 'in_progress', attempts = 1, lease_owner = 'w',"
                 " lease_expires_at = now() + interval '1 minute' where message_id = %s", (asked["member_shop"],))

    conn.execute("update assistants set offered_to = 'members' where id = %s", (tutor,))
    conn.execute("update assistants set is_active = false where id = %s", (shop,))

    def outcome(name: str) -> tuple:
        return conn.execute("""
            select r.status, r.last_error_code, m.content, e.status, e.error_code, e.model
              from assistant_runs r
              left join assistant_messages m on m.reply_to = r.message_id
              left join assistant_inference_events e on e.run_id = r.id
             where r.message_id = %s""", (asked[name],)).fetchone()

    withdrawn = ("failed", "assistant_unavailable",
                 "Sorry, this assistant is no longer available. Move the conversation to another assistant or start a new one.",
                 "failed", "assistant_unavailable", "not_started")
    assert outcome("guest_shop") == withdrawn
    assert outcome("guest_tutor") == withdrawn
    assert outcome("member_tutor")[:2] == ("queued", None)  # members-only still answers members
    assert outcome("member_shop")[:2] == ("in_progress", None)
    # Changing anything else of an inactive assistant ends nothing more (and nothing twice).
    conn.execute("update assistants set name = 'Old shop' where id = %s", (shop,))
    assert q("select count(*) from assistant_inference_events") == 2


@pytest.mark.parametrize("withdrawal", ["deactivated", "members_only"])
def test_a_message_written_as_its_assistant_is_withdrawn_is_not_answered(db_url: str, conn, withdrawal: str) -> None:
    """The insert checked the assistant before the withdrawal committed, and was not committed
    when the withdrawal ended the queued runs: its run ends at the claim (migration 20261123001400)."""
    q = lambda sql, *p: conn.execute(sql, p).fetchone()[0]  # noqa: E731
    assistant = q("insert into assistants (slug, name) values ('racing', 'Racing') returning id")
    user = create_user(conn, is_anonymous=True)
    thread = q("insert into assistant_threads (user_id, assistant_id) values (%s, %s) returning id", user, assistant)
    change = "is_active = false" if withdrawal == "deactivated" else "offered_to = 'members'"
    with request(conn, postgrest.user("g", user, is_anonymous=True), commit=True) as cur:
        message = cur.execute("insert into assistant_messages (thread_id, role, content) values (%s, 'user', 'hi')"
                              " returning id", (thread,)).fetchone()[0]
        with psycopg.connect(db_url, autocommit=True) as operator:  # meanwhile, in the dashboard
            operator.execute("set statement_timeout = '10s'")  # (it waits for nothing of the insert)
            operator.execute(f"update assistants set {change} where id = %s", (assistant,))
    assert q("select status from assistant_runs where message_id = %s", message) == "queued"  # the withdrawal missed it

    with conn.transaction():  # as the worker's claim through PostgREST: the service role reads no auth.users
        conn.execute("set local role service_role")
        [refused] = conn.cursor(row_factory=psycopg.rows.dict_row).execute(
            "select * from claim_runs('w1', 10, 60)").fetchall()
    assert (refused["message_id"], refused["blocked_code"], refused["content"]) == (message, "assistant_unavailable", None)
    assert conn.execute("""
        select r.status, r.last_error_code, r.admitted_at is null, m.content, e.status, e.error_code, e.model, e.attempt
          from assistant_runs r
          join assistant_messages m on m.reply_to = r.message_id
          join assistant_inference_events e on e.run_id = r.id
         where r.message_id = %s""", (message,)).fetchone() == (
        "failed", "assistant_unavailable", True,
        "Sorry, this assistant is no longer available. Move the conversation to another assistant or start a new one.",
        "failed", "assistant_unavailable", "not_started", 1)
    assert q("select count(*) from ai_usage_windows where user_id = %s", user) == 0  # not admitted, not counted


async def test_the_worker_counts_a_run_ended_at_the_claim_as_failed(db_url, simulator) -> None:
    assistant = await make_assistant(db_url, slug="closing", name="Closing")
    user, _ = await new_user_thread(db_url)
    thread = await thread_with(db_url, user, assistant["id"])
    message = await say(db_url, user, thread, "anyone?")
    # A guest's run that the withdrawal missed (see the test above), made so by hand.
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("update auth.users set is_anonymous = true where id = %s", (user,))
        await conn.execute("alter table assistants disable trigger assistants_after_withdrawal")
        await conn.execute("update assistants set offered_to = 'members' where id = %s", (assistant["id"],))
    async with running_worker(worker_settings(simulator.base_url), db_url) as worker:
        [run] = await finished_runs(db_url, 1)

        async def counted() -> bool:
            return sample(worker, "assistant_runs_failed_total") == 1

        await wait_until(counted, what="the run counted as failed")
    assert (run["message_id"], run["status"], run["last_error_code"]) == (message, "failed", "assistant_unavailable")
    assert simulator.creates == []
    assert sample(worker, "assistant_run_attempts_failed_total") == 1
    assert (worker.counts["blocked"], sample(worker, "assistant_runs_blocked_total")) == (0, None)


def sample(worker: Any, name: str) -> float | None:
    return worker.metrics.registry.get_sample_value(name, {"error_code": "assistant_unavailable"})


async def test_the_worker_refuses_a_run_of_an_inactive_assistant(db_url, simulator) -> None:
    """A run that came back to the queue after its assistant was deactivated (its attempt was
    in progress then) is not sent to the model."""
    assistant = await make_assistant(db_url, slug="gone", name="Gone")
    user, _ = await new_user_thread(db_url)
    thread = await thread_with(db_url, user, assistant["id"])
    message = await say(db_url, user, thread, "still there?")
    await query(db_url, "update assistant_runs set status = 'in_progress', attempts = 1, lease_owner = 'w',"
                        " lease_expires_at = now() + interval '1 minute' where message_id = %s returning id", (message,))
    await query(db_url, "update assistants set is_active = false where id = %s returning id", (assistant["id"],))
    await query(db_url, "update assistant_runs set status = 'queued', lease_owner = null, lease_expires_at = null"
                        " where message_id = %s returning id", (message,))  # as fail_attempt gives it back
    async with running_worker(worker_settings(simulator.base_url), db_url):
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["last_error_code"]) == ("failed", "assistant_unavailable")
    assert simulator.creates == []
    [reply] = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert reply["content"].startswith("Sorry, this assistant is no longer available.")
