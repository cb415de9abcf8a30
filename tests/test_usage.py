"""Plans, windows and atomic admission; usage and cost counted once; reports."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from psycopg.rows import dict_row

from tests import postgrest
from tests.conftest import PROJECT_DIR, user_message
from tests.postgrest import create_user, request
from worker import migrations


def make_plan(conn: psycopg.Connection, plan: str, limits: list[tuple[str, str, float | None]],
              uses_own_key: bool = False) -> str:
    conn.execute("insert into ai_plans (id, name, uses_own_key) values (%s, %s, %s)", (plan, plan, uses_own_key))
    for metric, window, value in limits:
        conn.execute("insert into ai_plan_limits (plan_id, metric, time_window, limit_value) values (%s, %s, %s, %s)",
                     (plan, metric, window, value))
    return plan


def admit(conn: psycopg.Connection, user: uuid.UUID, vision: bool = False) -> dict:
    return conn.execute("select admit_request(%s, %s)", (user, vision)).fetchone()[0]


def admitted_count(conn: psycopg.Connection, user: uuid.UUID, times: int, vision: bool = False) -> int:
    return sum(bool(admit(conn, user, vision)["admitted"]) for _ in range(times))


def age_counters(conn: psycopg.Connection, user: uuid.UUID, window: str) -> None:
    """Pretend the current `window` is over: its counters now belong to the previous window."""
    conn.execute("update ai_usage_windows set window_start = window_start - ('1 ' || time_window)::interval"
                 " where user_id = %s and time_window = %s", (user, window))


def window_end(window: str) -> datetime:
    now = datetime.now(timezone.utc)
    start = {"hour": now.replace(minute=0, second=0, microsecond=0),
             "day": now.replace(hour=0, minute=0, second=0, microsecond=0)}[window]
    return start + (timedelta(hours=1) if window == "hour" else timedelta(days=1))


def test_200_concurrent_admissions_at_a_limit_of_10_admit_exactly_10(db_url: str, conn: psycopg.Connection) -> None:
    make_plan(conn, "ten_a_day", [("messages", "day", 10)])
    user = create_user(conn, plan="ten_a_day")
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(200)

    def one() -> None:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait()
            verdict = admit(c, user)
        with lock:
            results.append(bool(verdict["admitted"]))

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200 and results.count(True) == 10
    used = conn.execute("select used from ai_usage_counters where user_id = %s and metric = 'messages'"
                        " and time_window = 'day'", (user,)).fetchone()[0]
    assert used == 10


def test_a_burst_of_messages_through_concurrent_claims_gets_exactly_the_limit(db_url: str, conn) -> None:
    make_plan(conn, "ten_a_day", [("messages", "day", 10)])
    user = create_user(conn, plan="ten_a_day")
    thread = conn.execute("insert into assistant_threads (user_id) values (%s) returning id", (user,)).fetchone()[0]
    for i in range(60):
        user_message(conn, user, thread, f"burst {i}")
    barrier = threading.Barrier(6)

    def claimer(name: str) -> None:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait()
            while c.execute("select count(*) from claim_runs(%s, 4, 60)", (name,)).fetchone()[0] or \
                    c.execute("select count(*) from assistant_runs where status = 'queued'").fetchone()[0]:
                pass

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = dict(conn.execute("select status, count(*) from assistant_runs group by status").fetchall())
    assert statuses == {"in_progress": 10, "blocked": 50}
    assert conn.execute("select count(*) from assistant_inference_events where status = 'blocked'").fetchone()[0] == 50


@pytest.mark.parametrize("window", ["hour", "day", "week", "month"])
def test_each_window_limits_and_a_new_window_starts_from_zero(conn, window: str) -> None:
    make_plan(conn, f"two_per_{window}", [("messages", window, 2)])
    user = create_user(conn, plan=f"two_per_{window}")
    assert admitted_count(conn, user, 3) == 2
    verdict = admit(conn, user)
    expected_end = conn.execute("select ai_window_start(%s) + ('1 ' || %s)::interval", (window, window)).fetchone()[0]
    assert verdict["reason"] == "limit_reached" and verdict["window"] == window
    assert datetime.fromisoformat(verdict["resets_at"]) == expected_end
    age_counters(conn, user, window)  # no reset job: the next window simply has no row yet
    assert admitted_count(conn, user, 3) == 2


def test_hourly_and_daily_limits_together(conn) -> None:
    make_plan(conn, "burst_and_day", [("requests", "hour", 3), ("messages", "day", 5)])
    user = create_user(conn, plan="burst_and_day")
    assert admitted_count(conn, user, 4) == 3
    verdict = admit(conn, user)
    assert (verdict["metric"], verdict["window"]) == ("requests", "hour")
    assert datetime.fromisoformat(verdict["resets_at"]) == window_end("hour")
    age_counters(conn, user, "hour")
    assert admitted_count(conn, user, 4) == 2  # 5 a day in all
    verdict = admit(conn, user)
    assert (verdict["metric"], verdict["window"]) == ("messages", "day")
    assert datetime.fromisoformat(verdict["resets_at"]) == window_end("day")
    age_counters(conn, user, "hour")
    assert not admit(conn, user)["admitted"]  # a new hour does not lift the daily limit


def test_default_plans_reproduce_the_seeds(conn) -> None:
    limits = {(p, m, w): v for p, m, w, v in conn.execute(
        "select plan_id, metric, time_window, limit_value from ai_plan_limits where plan_id <> 'unlimited'")}
    assert limits[("free", "messages", "day")] == 10
    assert limits[("premium", "messages", "day")] == 100
    assert not [k for k in limits if k[0] == "byok"]
    assert all(("hour" in {w for p, m, w in limits if p == plan}) for plan in ("guest", "free", "premium"))


def test_free_plan_admits_ten_messages_a_day(conn) -> None:
    user = create_user(conn, plan=None)
    assert conn.execute("select plan_id from user_ai_settings where user_id = %s", (user,)).fetchone()[0] == "free"
    admitted = 0
    for _ in range(3):  # the hourly request cap (6) binds first; each new hour admits more
        admitted += admitted_count(conn, user, 12)
        age_counters(conn, user, "hour")
    assert admitted == 10
    assert admit(conn, user)["metric"] == "messages"


def test_vision_messages_have_their_own_limit(conn) -> None:
    user = create_user(conn, plan=None)
    assert admitted_count(conn, user, 4, vision=True) == 3
    verdict = admit(conn, user, vision=True)
    assert (verdict["metric"], verdict["window"]) == ("vision_messages", "day")
    assert admit(conn, user)["admitted"]  # text still goes through


def test_guests_are_on_the_guest_plan_until_they_sign_up(conn) -> None:
    guest = create_user(conn, is_anonymous=True, plan=None)
    free = create_user(conn, plan=None)
    plans = dict(conn.execute("select user_id, plan_id from user_ai_settings where user_id in (%s, %s)", (guest, free)))
    assert plans == {guest: "guest", free: "free"}
    assert admitted_count(conn, guest, 10) == 5
    assert admitted_count(conn, free, 10) == 6  # free's hourly cap
    conn.execute("update auth.users set is_anonymous = false where id = %s", (guest,))
    assert conn.execute("select plan_id from user_ai_settings where user_id = %s", (guest,)).fetchone()[0] == "free"


def test_byok_is_unlimited_once_a_token_is_set(conn) -> None:
    user = create_user(conn, plan="byok")
    assert admit(conn, user) == {"admitted": False, "reason": "byok_token_missing", "plan": "byok"}
    with request(conn, postgrest.user("u", user), commit=True) as cur:
        cur.execute("select set_my_replicate_token('r8_abcdefghijklmnopqrstuvwxyz0123')")
    assert admitted_count(conn, user, 300) == 300


def test_token_and_cost_limits_refuse_once_reached(conn) -> None:
    make_plan(conn, "metered", [("tokens", "day", 100), ("cost_usd", "month", Decimal("0.01"))])
    user = create_user(conn, plan="metered")
    assert admit(conn, user)["admitted"]
    conn.execute("select ai_usage_add(%s, '{\"tokens\": 100}')", (user,))
    verdict = admit(conn, user)
    assert (verdict["metric"], verdict["limit"]) == ("tokens", 100)
    age_counters(conn, user, "day")
    conn.execute("select ai_usage_add(%s, '{\"cost_usd\": 0.01}')", (user,))
    assert admit(conn, user)["metric"] == "cost_usd"


def test_refusal_text_names_the_limit_and_its_reset(conn) -> None:
    text = conn.execute("""select ai_refusal_text('{"reason":"limit_reached","plan":"free","metric":"messages",
        "window":"day","limit":10,"used":10,"resets_at":"2026-11-23T00:00:00+00:00"}')""").fetchone()[0]
    assert text == "You have reached your limit of 10 messages per day on the free plan. It resets at 2026-11-23 00:00 UTC."
    text = conn.execute("""select ai_refusal_text('{"reason":"limit_reached","plan":"guest","metric":"vision_messages",
        "window":"day","limit":1,"used":1,"resets_at":"2026-11-23T00:00:00+00:00"}')""").fetchone()[0]
    assert text.startswith("You have reached your limit of 1 image message per day on the guest plan.")


def test_usage_and_cost_are_counted_once_across_a_repeated_completion(conn, owner, thread) -> None:
    user_message(conn, owner, thread)
    run = conn.cursor(row_factory=dict_row).execute("select * from claim_runs('w', 1, 60)").fetchone()
    args = (run["run_id"], run["attempt"], Decimal("0.000125"))
    complete = "select complete_run(%s, %s, 'An answer.', 'm', p_input_tokens => 30, p_output_tokens => 12, p_cost_usd => %s)"
    first = conn.execute(complete, args).fetchone()[0]
    assert conn.execute(complete, args).fetchone()[0] == first
    used = {(m, w): u for m, w, u in conn.execute(
        "select metric, time_window, used from ai_usage_counters where user_id = %s", (owner,))}
    for window in ("hour", "day", "week", "month"):
        assert used[("messages", window)] == 1 and used[("requests", window)] == 1
        assert used[("tokens", window)] == 42 and used[("cost_usd", window)] == Decimal("0.000125")


def test_users_read_their_usage_and_what_remains(conn) -> None:
    user = create_user(conn, plan=None)
    admitted_count(conn, user, 2)
    with request(conn, postgrest.user("u", user)) as cur:
        rows = cur.execute("select * from my_ai_usage()").fetchall()
    usage = {(r[1], r[2]): (r[3], r[4], r[5]) for r in rows}
    assert rows[0][0] == "free"
    assert usage[("messages", "day")] == (10, 2, 8)
    assert usage[("requests", "hour")] == (6, 2, 4)
    assert usage[("vision_messages", "day")] == (3, 0, 3)
    with request(conn, postgrest.anon()) as cur:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("select * from my_ai_usage()")


def test_operator_reports_per_day_and_month(conn, owner, thread) -> None:
    for cost in ("0.000100", "0.000250"):
        user_message(conn, owner, thread)
        run = conn.cursor(row_factory=dict_row).execute("select * from claim_runs('w', 1, 60)").fetchone()
        conn.execute("select complete_run(%s, %s, 'ok', 'meta/meta-llama-3-8b-instruct', p_input_tokens => 10,"
                     " p_output_tokens => 5, p_cost_usd => %s)", (run["run_id"], run["attempt"], Decimal(cost)))
    conn.execute("select refresh_ai_usage_reports()")
    [daily] = conn.execute("select replies, input_tokens, output_tokens, cost_usd from ai_usage_daily where user_id = %s",
                           (owner,)).fetchall()
    assert daily == (2, 20, 10, Decimal("0.000350"))
    [monthly] = conn.execute("select replies, cost_usd from ai_usage_monthly where user_id = %s", (owner,)).fetchall()
    assert monthly == (2, Decimal("0.000350"))
    [today] = conn.execute("select replies, cost_usd from ai_usage_today where user_id = %s", (owner,)).fetchall()
    assert today == (2, Decimal("0.000350"))


def test_premium_plan_admits_a_hundred_messages_a_day(conn) -> None:
    user = create_user(conn, plan="premium")
    admitted = 0
    for _ in range(3):  # 60 requests an hour, 100 messages a day
        admitted += admitted_count(conn, user, 70)
        age_counters(conn, user, "hour")
    assert admitted == 100
    assert admit(conn, user)["window"] == "day"


# -- usage in one row per user and window (migration 20261122000700) ------------------------------
WINDOWS_ROLLBACK = PROJECT_DIR / "supabase" / "rollbacks" / "20261122000700_usage_windows.down.sql"
COUNTERS = "select metric, time_window, used from ai_usage_counters where user_id = %s order by 1, 2"


def test_usage_windows_keep_the_counts_of_the_per_metric_counters_both_ways(cluster, template_db) -> None:
    url = cluster.create_database("usage_windows_upgrade", template=template_db)
    with psycopg.connect(url, autocommit=True) as conn:
        user = create_user(conn)
        conn.execute("""select ai_usage_add(%s, '{"messages": 2, "tokens": 120, "cost_usd": 0.0031}')""", (user,))
        counted = conn.execute(COUNTERS, (user,)).fetchall()
        assert len(counted) == 12 and {m for m, _, _ in counted} == {"messages", "tokens", "cost_usd"}

        conn.execute(WINDOWS_ROLLBACK.read_text())  # back to one row per metric and window
        assert conn.execute("select relkind from pg_class where oid = 'public.ai_usage_counters'::regclass"
                            ).fetchone()[0] == "r"
        assert conn.execute(COUNTERS, (user,)).fetchall() == counted
        conn.execute("""select ai_usage_add(%s, '{"requests": 1}')""", (user,))  # counted the old way

        assert migrations.prepare(url, project_dir=PROJECT_DIR, seed=False) == ["20261122000700"]
        requests = [("requests", w, Decimal(1)) for w in ("day", "hour", "month", "week")]
        assert conn.execute(COUNTERS, (user,)).fetchall() == sorted(counted + requests)
        rows = conn.execute("select time_window, messages, vision_messages, requests, tokens, cost_usd"
                            " from ai_usage_windows where user_id = %s order by 1", (user,)).fetchall()
        assert rows == [(w, 2, 0, 1, 120, Decimal("0.0031")) for w in ("day", "hour", "month", "week")]


def test_usage_add_refuses_unknown_metrics_and_ignores_what_is_not_positive(conn) -> None:
    user = create_user(conn)
    for deltas, reason in (('{"messages": 1, "bogus": 1}', "unknown usage metric"),
                           ("[1]", "must be a JSON object")):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=reason):
            conn.execute("select ai_usage_add(%s, %s)", (user, deltas))
    conn.execute("""select ai_usage_add(%s, '{"messages": 0, "tokens": -5}')""", (user,))
    assert conn.execute("select count(*) from ai_usage_windows where user_id = %s", (user,)).fetchone()[0] == 0
    conn.execute("""select ai_usage_add(%s, '{"messages": 1, "tokens": -5}')""", (user,))
    assert conn.execute(COUNTERS, (user,)).fetchall() == [
        ("messages", w, Decimal(1)) for w in ("day", "hour", "month", "week")]


def test_admissions_and_completions_of_one_user_at_once_never_deadlock(db_url: str, conn) -> None:
    """Admission locks the user's windows in the order completions write them (hour, day, week,
    month); in any other order the two wait for each other and PostgreSQL aborts one."""
    make_plan(conn, "hourly_and_monthly", [("messages", "month", 100_000), ("tokens", "hour", 10_000_000)])
    user = create_user(conn, plan="hourly_and_monthly")
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def one(admits: bool) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as c:
                barrier.wait()
                for _ in range(40):
                    with c.transaction():  # as claim_runs and complete_runs do: several steps in one transaction
                        if admits:
                            assert admit(c, user)["admitted"]
                        c.execute("""select ai_usage_add(%s, '{"tokens": 3, "cost_usd": 0.001}')""", (user,))
                        if not admits:
                            assert admit(c, user)["admitted"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert dict(((m, w), u) for m, w, u in conn.execute(COUNTERS, (user,)))[("messages", "month")] == 16 * 40


def windows_of(conn: psycopg.Connection, user: uuid.UUID) -> set[tuple[str, datetime]]:
    return set(conn.execute("select time_window, window_start from ai_usage_windows where user_id = %s", (user,)).fetchall())


def test_usage_windows_past_their_retention_are_pruned(conn) -> None:
    """Hour windows are kept 7 days after they end, the others 13 months; the current windows,
    and with them admission, are untouched; a call deletes at most its limit."""
    user = create_user(conn)

    def ago(window: str, amount: str) -> datetime:  # the start of the `window` this long before the current one
        return conn.execute("select ai_window_start(%s) - %s::interval", (window, amount)).fetchone()[0]

    kept = {(w, ago(w, a)) for w, a in [
        ("hour", "0 hours"), ("hour", "1 hour"), ("hour", "166 hours"),  # ended within the last 7 days
        ("day", "0 days"), ("day", "1 day"), ("day", "380 days"),  # within 13 months
        ("week", "0 weeks"), ("week", "55 weeks"), ("month", "0 months"), ("month", "12 months")]}
    gone = {(w, ago(w, a)) for w, a in [
        ("hour", "169 hours"), ("hour", "30 days"), ("day", "400 days"), ("day", "800 days"),
        ("week", "58 weeks"), ("week", "100 weeks"), ("month", "15 months"), ("month", "30 months")]}
    for window, window_start in kept | gone:
        conn.execute("insert into ai_usage_windows (user_id, time_window, window_start, messages) values (%s, %s, %s, 1)",
                     (user, window, window_start))
    assert conn.execute("select prune_usage_windows(p_limit => 3)").fetchone()[0] == 3
    assert len(windows_of(conn, user)) == len(kept) + len(gone) - 3
    assert conn.execute("select prune_usage_windows()").fetchone()[0] == len(gone) - 3
    assert windows_of(conn, user) == kept
    assert conn.execute("select prune_usage_windows()").fetchone()[0] == 0
    # Custom retention: hour windows a day, the others a year.
    assert conn.execute("select prune_usage_windows(interval '1 day', interval '1 year')").fetchone()[0] == 3
    assert windows_of(conn, user) == kept - {("hour", ago("hour", "166 hours")), ("day", ago("day", "380 days")),
                                             ("week", ago("week", "55 weeks"))}


@pytest.mark.parametrize(("args", "message"), [
    ("p_hours_kept => interval '10 minutes'", "retention must be at least"),
    ("p_others_kept => interval '1 week'", "retention must be at least"),
    ("p_hours_kept => null", "retention must be at least"),
    ("p_limit => 0", "p_limit must be between"),
])
def test_pruning_usage_windows_says_what_it_needs(conn, args: str, message: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        conn.execute(f"select prune_usage_windows({args})")
