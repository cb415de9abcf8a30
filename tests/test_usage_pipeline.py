"""Limits and BYOK through the running worker, with Replicate answered by the simulator."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from cryptography.fernet import Fernet

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
from worker.simulator import ReplicateSimulator

TOKEN = "r8_UserOwnToken0123456789abcdefghijkl"

# Supabase Vault's SQL API (create_secret, update_secret, decrypted_secrets), as a stand-in: the
# real one encrypts `secret` with pgsodium; this one only has to answer the same calls.
VAULT_STAND_IN = """
create schema vault;
create table vault.secrets (id uuid primary key default gen_random_uuid(), name text unique, description text,
                            secret text not null, created_at timestamptz default now(), updated_at timestamptz default now());
create function vault.create_secret(new_secret text, new_name text default null, new_description text default '',
                                    new_key_id uuid default null) returns uuid language sql as $$
  insert into vault.secrets (secret, name, description) values (new_secret, new_name, new_description) returning id $$;
create function vault.update_secret(secret_id uuid, new_secret text default null, new_name text default null,
                                    new_description text default null, new_key_id uuid default null) returns void language sql as $$
  update vault.secrets set secret = coalesce(new_secret, secret), updated_at = now() where id = secret_id $$;
create view vault.decrypted_secrets as select id, name, description, secret, secret as decrypted_secret from vault.secrets;
"""


async def execute(db_url: str, sql: str, params: tuple = ()) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(sql, params)


async def test_a_blocked_request_never_reaches_replicate_and_tells_the_user_why(db_url, simulator) -> None:
    await execute(db_url, "insert into ai_plans (id, name) values ('one_a_day', 'One a day');"
                          "insert into ai_plan_limits values ('one_a_day', 'messages', 'day', 1)")
    user, thread = await new_user_thread(db_url, plan="one_a_day")
    async with running_worker(worker_settings(simulator.base_url), db_url):
        await say(db_url, user, thread, "first")
        await finished_runs(db_url, 1)
        second = await say(db_url, user, thread, "second")
        runs = await finished_runs(db_url, 2)
    assert sorted(r["status"] for r in runs) == ["blocked", "completed"]
    assert len(simulator.creates) == 1
    [reply] = await query(db_url, "select content, metadata_json from assistant_messages where reply_to = %s", (second,))
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%d")
    assert reply["content"] == (f"You have reached your limit of 1 message per day on the one_a_day plan."
                                f" It resets at {tomorrow} 00:00 UTC.")
    assert reply["metadata_json"]["blocked"] is True and reply["metadata_json"]["error_code"] == "quota_exceeded"
    [event] = await query(db_url, "select * from assistant_inference_events where message_id = %s", (second,))
    assert (event["status"], event["error_code"], event["model"]) == ("blocked", "quota_exceeded", "meta/meta-llama-3-8b-instruct")
    assert event["safety_flags_json"]["admission"]["metric"] == "messages"
    assert event["safety_flags_json"]["admission"]["limit"] == 1
    # The user sees the refusal in their run too.
    [run] = await as_user(db_url, user, "select status, last_error_code, last_error from assistant_runs where message_id = %s",
                          (second,))
    assert run["status"] == "blocked" and run["last_error"] == reply["content"]


async def test_the_worker_prunes_usage_windows_past_their_retention(db_url, simulator, caplog) -> None:
    user, _ = await new_user_thread(db_url)
    await execute(db_url, "insert into ai_usage_windows (user_id, time_window, window_start, messages) values"
                          f" ('{user}', 'hour', ai_window_start('hour') - interval '30 days', 3),"
                          f" ('{user}', 'hour', ai_window_start('hour'), 1), ('{user}', 'day', ai_window_start('day'), 4)")
    settings = worker_settings(simulator.base_url, worker_sweep_interval_seconds=0.1, usage_prune_interval_seconds=3600)
    with caplog.at_level(logging.INFO, logger="worker.pipeline"):
        async with running_worker(settings, db_url):
            # Pruned when the worker starts, and then every hour.
            await wait_until(lambda: query(db_url, "select 1 where not exists (select 1 from ai_usage_windows"
                                                   " where window_start < now() - interval '7 days')"),
                             what="the old hour window to be pruned")
    windows = await query(db_url, "select time_window, messages from ai_usage_windows where user_id = %s order by 1", (user,))
    assert windows == [{"time_window": "day", "messages": 4}, {"time_window": "hour", "messages": 1}]
    assert [r.windows for r in caplog.records if getattr(r, "event", None) == "usage.pruned"] == [1]


async def test_byok_without_vault_uses_the_users_token_and_keeps_it_encrypted(db_url, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    simulator = ReplicateSimulator(latency=0.02, token=TOKEN)  # only the user's own token works
    await simulator.start()
    key = Fernet.generate_key().decode()
    try:
        user, thread = await new_user_thread(db_url, plan="byok")
        await as_user(db_url, user, "select set_my_replicate_token(%s)", (TOKEN,))
        [stored] = await query(db_url, "select pending_token, ciphertext from user_replicate_tokens")
        assert stored["pending_token"] == TOKEN and stored["ciphertext"] is None
        settings = worker_settings(simulator.base_url, replicate_api_token="r8_operator_token", byok_encryption_key=key)
        async with running_worker(settings, db_url):
            await say(db_url, user, thread, "on my own account")
            await finished_runs(db_url, 1)
            await say(db_url, user, thread, "again")
            runs = await finished_runs(db_url, 2)
    finally:
        await simulator.stop()
    assert {r["status"] for r in runs} == {"completed"}
    assert [c.headers["Authorization"] for c in simulator.creates] == [f"Bearer {TOKEN}"] * 2
    [stored] = await query(db_url, "select pending_token, ciphertext from user_replicate_tokens")
    assert stored["pending_token"] is None
    assert Fernet(key.encode()).decrypt(stored["ciphertext"].encode()).decode() == TOKEN
    assert TOKEN not in caplog.text


async def test_a_refused_user_token_is_reported_as_theirs(db_url, simulator) -> None:
    user, thread = await new_user_thread(db_url, plan="byok")
    await as_user(db_url, user, "select set_my_replicate_token(%s)", (TOKEN,))  # the simulator accepts only r8_test
    async with running_worker(worker_settings(simulator.base_url), db_url):
        message = await say(db_url, user, thread, "hello")
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["last_error_code"]) == ("failed", "byok_token_invalid")
    [reply] = await query(db_url, "select content from assistant_messages where reply_to = %s", (message,))
    assert "Replicate refused your API token" in reply["content"]


@pytest.mark.parametrize("clear_after", [False, True])
async def test_byok_with_vault_stores_the_token_as_a_vault_secret(db_url, simulator, clear_after: bool) -> None:
    simulator.token = TOKEN
    await execute(db_url, VAULT_STAND_IN)
    user, thread = await new_user_thread(db_url, plan="byok")
    await as_user(db_url, user, "select set_my_replicate_token(%s)", (TOKEN,))
    [stored] = await query(db_url, "select vault_secret_id, pending_token, ciphertext from user_replicate_tokens")
    assert stored["vault_secret_id"] is not None and stored["pending_token"] is None and stored["ciphertext"] is None
    [secret] = await query(db_url, "select name, secret from vault.secrets")
    assert secret == {"name": f"replicate_token_{user}", "secret": TOKEN}
    if clear_after:
        await as_user(db_url, user, "select set_my_replicate_token(null)")
        assert await query(db_url, "select * from vault.secrets") == []
        assert await query(db_url, "select * from user_replicate_tokens") == []
        return
    async with running_worker(worker_settings(simulator.base_url, replicate_api_token="r8_operator"), db_url):
        await say(db_url, user, thread, "vault please")
        [run] = await finished_runs(db_url, 1)
    assert run["status"] == "completed"
    assert simulator.creates[0].headers["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("removal", ["delete from auth.users where id = %(user)s",
                                     "delete from user_replicate_tokens where user_id = %(user)s",
                                     "update user_replicate_tokens set vault_secret_id = null,"
                                     " pending_token = 'r8_replacement_token_0123456789' where user_id = %(user)s"])
async def test_a_vault_secret_goes_with_its_token_row(db_url, removal: str) -> None:
    """Deleting the account (which cascades to the token row), the row itself, or pointing it
    away from its secret deletes the Vault secret: no token outlives its user."""
    await execute(db_url, VAULT_STAND_IN)
    user, _ = await new_user_thread(db_url, plan="byok")
    other, _ = await new_user_thread(db_url, plan="byok")
    for who in (user, other):
        await as_user(db_url, who, "select set_my_replicate_token(%s)", (TOKEN,))
    assert len(await query(db_url, "select id from vault.secrets")) == 2
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(removal, {"user": user})
    left = await query(db_url, "select name from vault.secrets")
    assert left == [{"name": f"replicate_token_{other}"}]  # the other user's secret stays
