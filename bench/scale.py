"""Database at scale: threads and messages generated set-based, then three requests measured as
PostgREST runs them (one transaction: `set local role`, the JWT claims in `request.jwt.claims`,
the query), with the policies as migrated — `user_id = (select auth.uid())` — and with the naive
form `auth.uid() = user_id`, on the same data.

- a thread's last 50 messages   GET /rest/v1/assistant_messages?thread_id=eq.…&order=created_at.desc&limit=50
- the user's 20 latest threads  GET /rest/v1/assistant_threads?archived_at=is.null&order=last_message_at.desc.nullslast&limit=20
  (no user filter: RLS alone scopes both, as in most apps)
- one quota admission           select admit_request(user, false), as service_role (BYPASSRLS: the
  policy form cannot matter there; it is measured twice all the same so the ratio shows ~1)
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import psycopg

from bench.cluster import LIMITED_PLAN, BenchCluster
from bench.measure import summary

# PostgREST's read query shape (v12): the rows in a CTE, aggregated to one JSON body.
POSTGREST_READ = """
with pgrst_source as ({inner})
select null::bigint as total_result_set, pg_catalog.count(_postgrest_t) as page_total,
       coalesce(json_agg(_postgrest_t), '[]') as body,
       nullif(current_setting('response.headers', true), '') as response_headers,
       nullif(current_setting('response.status', true), '') as response_status,
       '' as response_inserted
  from (select * from pgrst_source) _postgrest_t"""

LAST_MESSAGES = POSTGREST_READ.format(inner="""
select "public"."assistant_messages".* from "public"."assistant_messages"
 where "public"."assistant_messages"."thread_id" = %s
 order by "public"."assistant_messages"."created_at" desc limit 50 offset 0""")

LATEST_THREADS = POSTGREST_READ.format(inner="""
select "public"."assistant_threads".* from "public"."assistant_threads"
 where "public"."assistant_threads"."archived_at" is null
 order by "public"."assistant_threads"."last_message_at" desc nulls last limit 20 offset 0""")

ADMISSION = "select public.admit_request(%s, false)"

NAIVE = {
    ("assistant_threads", "users read their own threads"): "auth.uid() = user_id",
    ("assistant_messages", "users read their own messages"): "auth.uid() = user_id",
}


def _sizes(threads: int) -> dict[str, int]:
    """Every 10th thread is long (110 messages), the others have 10: 2,000,000 messages for
    100,000 threads. 25 threads per user; every 20th thread archived."""
    long_threads = threads // 10
    return {"threads": threads, "users": max(1, threads // 25), "long_threads": long_threads,
            "messages": long_threads * 110 + (threads - long_threads) * 10}


def load(url: str, threads: int, log: Any = print) -> dict[str, Any]:
    sizes = _sizes(threads)
    users = sizes["users"]
    timings: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        # Bulk load as superuser with triggers (and the FK triggers) off; the rows are made
        # consistent by construction. Ids are md5-derived so that they can be recomputed.
        conn.execute("set session_replication_role = replica")
        conn.execute("set maintenance_work_mem = '512MB'")

        started = time.monotonic()
        conn.execute("""
            insert into auth.users (id, aud, role, email, created_at)
            select md5('bench-user-' || g)::uuid, 'authenticated', 'authenticated', 'scale' || g || '@bench.example',
                   now() - interval '120 days'
              from generate_series(1, %(users)s::int) g""", {"users": users})
        conn.execute("""
            insert into user_ai_settings (user_id, plan_id)
            select md5('bench-user-' || g)::uuid, %(plan)s from generate_series(1, %(users)s::int) g""",
                     {"users": users, "plan": LIMITED_PLAN})
        conn.execute("""
            insert into assistant_threads (id, user_id, title, created_at, updated_at, last_message_at, archived_at)
            select md5('bench-thread-' || t)::uuid, md5('bench-user-' || ((t - 1) %% %(users)s + 1))::uuid,
                   'Thread ' || t, c, c, c + (case when t %% 10 = 0 then 110 else 10 end) * interval '30 seconds',
                   case when t %% 20 = 1 then c + interval '1 day' end
              from generate_series(1, %(threads)s::int) t,
                   lateral (select now() - interval '90 days' + ((t * 7919) %% 7776000) * interval '1 second') x(c)""",
                     {"users": users, "threads": threads})
        timings["users_and_threads"] = time.monotonic() - started

        started = time.monotonic()
        batch = 10_000
        for first in range(1, threads + 1, batch):
            last = min(threads, first + batch - 1)
            conn.execute("""
                insert into assistant_messages (id, thread_id, user_id, role, content, reply_to, model, token_count,
                                                latency_ms, created_at, metadata_json)
                select md5('bench-msg-' || t || '-' || i)::uuid, md5('bench-thread-' || t)::uuid,
                       md5('bench-user-' || ((t - 1) %% %(users)s + 1))::uuid,
                       case when i %% 2 = 1 then 'user' else 'assistant' end,
                       case when i %% 2 = 1
                            then 'Question ' || i || ' in thread ' || t || ': how would I go about this, step by step?'
                            else 'Answer ' || i || ': ' || repeat('Here is a considered reply with some detail. ', 6) end,
                       case when i %% 2 = 0 then md5('bench-msg-' || t || '-' || (i - 1))::uuid end,
                       case when i %% 2 = 0 then 'meta/meta-llama-3-8b-instruct' end,
                       case when i %% 2 = 0 then 60 + i %% 40 end,
                       case when i %% 2 = 0 then 900 + (i * 37) %% 800 end,
                       now() - interval '90 days' + ((t * 7919) %% 7776000) * interval '1 second' + i * interval '30 seconds',
                       '{}'::jsonb
                  from generate_series(%(first)s::int, %(last)s::int) t,
                       lateral generate_series(1, case when t %% 10 = 0 then 110 else 10 end) i""",
                         {"users": users, "first": first, "last": last})
            if last % 50_000 == 0 or last == threads:
                log(f"    messages for {last:,} of {threads:,} threads ({time.monotonic() - started:.0f} s)")
        timings["messages"] = time.monotonic() - started

        # Usage history: past and current windows for every user (what a few months of use leave).
        started = time.monotonic()
        conn.execute("""
            insert into ai_usage_windows (user_id, time_window, window_start, messages, requests, tokens, cost_usd)
            select md5('bench-user-' || g)::uuid, w.time_window, w.window_start, 1 + (g %% 40), 1 + (g %% 40),
                   case when w.time_window in ('day', 'month') then 1 + (g %% 40) else 0 end,
                   case when w.time_window in ('day', 'month') then 1 + (g %% 40) else 0 end
              from generate_series(1, %(users)s::int) g
             cross join lateral (
               select 'hour' as time_window, s as window_start
                 from generate_series(date_trunc('hour', now()) - interval '47 hours', date_trunc('hour', now()), interval '1 hour') s
               union all
               select 'day', s from generate_series(date_trunc('day', now()) - interval '29 days', date_trunc('day', now()), interval '1 day') s
               union all
               select 'week', s from generate_series(date_trunc('week', now()) - interval '4 weeks', date_trunc('week', now()), interval '1 week') s
               union all
               select 'month', s from generate_series(date_trunc('month', now()) - interval '2 months', date_trunc('month', now()), interval '1 month') s
             ) w
            on conflict do nothing""", {"users": users})
        timings["usage_windows"] = time.monotonic() - started

        conn.execute("set session_replication_role = origin")
        started = time.monotonic()
        conn.execute("vacuum (analyze) assistant_threads, assistant_messages, ai_usage_windows, user_ai_settings, auth.users")
        timings["vacuum_analyze"] = time.monotonic() - started
        counts = {
            "users": conn.execute("select count(*) from auth.users").fetchone()[0],
            "threads": conn.execute("select count(*) from assistant_threads").fetchone()[0],
            "messages": conn.execute("select count(*) from assistant_messages").fetchone()[0],
            "usage_windows": conn.execute("select count(*) from ai_usage_windows").fetchone()[0],
            "database_mb": round(conn.execute("select pg_database_size(current_database())").fetchone()[0] / 2**20),
            "assistant_messages_mb": round(conn.execute(
                "select pg_total_relation_size('assistant_messages')").fetchone()[0] / 2**20),
        }
    return {"planned": sizes, "counts": counts, "load_seconds": {k: round(v, 1) for k, v in timings.items()}}


class Requests:
    """PostgREST-style requests on one connection (prepared after 5 uses, as PostgREST prepares)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True, application_name="bench-scale")

    def close(self) -> None:
        self.conn.close()

    def request(self, role: str, user: str | None, sql: str, params: tuple, *, explain: bool = False
                ) -> tuple[float, float, list[tuple]]:
        """(query ms, whole request ms, rows)."""
        claims = {"role": role} if user is None else {"sub": user, "role": role, "aud": "authenticated"}
        began = time.perf_counter()
        with self.conn.transaction():
            self.conn.execute(f"set local role {role}")
            self.conn.execute("select set_config('request.jwt.claims', %s, true), set_config('request.method', 'GET', true)",
                              (json.dumps(claims),))
            q0 = time.perf_counter()
            if explain:
                sql = "explain (analyze, buffers, format text) " + sql
            rows = self.conn.execute(sql, params).fetchall()
            q1 = time.perf_counter()
        ended = time.perf_counter()
        return (q1 - q0) * 1000, (ended - began) * 1000, rows


def _policy_quals(conn: psycopg.Connection) -> dict[tuple[str, str], str]:
    rows = conn.execute("""select tablename, policyname, qual from pg_policies
                            where schemaname = 'public' and (tablename, policyname) in
                                  (('assistant_threads', 'users read their own threads'),
                                   ('assistant_messages', 'users read their own messages'))""").fetchall()
    return {(t, p): q for t, p, q in rows}


def _set_policies(url: str, quals: dict[tuple[str, str], str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for (table, policy), qual in quals.items():
            conn.execute(f'alter policy "{policy}" on public.{table} using ({qual})')


def measure(url: str, iterations: int, log: Any = print, seed: int = 7) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        wrapped = _policy_quals(conn)
        long_threads = [(str(t), str(u)) for t, u in conn.execute(
            "select id, user_id from assistant_threads where archived_at is null and last_message_at - created_at > interval '30 minutes'"
        ).fetchall()]
        users = [str(r[0]) for r in conn.execute("select user_id from user_ai_settings where plan_id = %s",
                                                 (LIMITED_PLAN,)).fetchall()]
    rng = random.Random(seed)
    plans = {}
    forms = {"wrapped": wrapped, "naive": {k: v for k, v in NAIVE.items()}}
    samples: dict[str, dict[str, dict[str, list[float]]]] = {
        q: {f: {"query": [], "request": []} for f in forms} for q in ("last_50_messages", "latest_20_threads", "admission")}
    rows_seen: dict[str, list[int]] = {q: [] for q in samples}
    rls_ok = True
    req = Requests(url)
    try:
        # Two rounds per form, alternating, so that drift (cache, autovacuum) falls on both.
        for round_no in range(2):
            for form, quals in forms.items():
                _set_policies(url, quals)
                n = iterations // 2
                picks_t = [rng.choice(long_threads) for _ in range(n + 50)]
                picks_u = [rng.choice(users) for _ in range(n + 50)]
                for i, (thread, owner) in enumerate(picks_t):
                    q, r, rows = req.request("authenticated", owner, LAST_MESSAGES, (thread,))
                    if i >= 50:  # warm-up (and statement preparation) left out
                        samples["last_50_messages"][form]["query"].append(q)
                        samples["last_50_messages"][form]["request"].append(r)
                        rows_seen["last_50_messages"].append(rows[0][1])
                for i, user in enumerate(picks_u):
                    q, r, rows = req.request("authenticated", user, LATEST_THREADS, ())
                    if i >= 50:
                        samples["latest_20_threads"][form]["query"].append(q)
                        samples["latest_20_threads"][form]["request"].append(r)
                        rows_seen["latest_20_threads"].append(rows[0][1])
                        body = rows[0][2]
                        if any(t["user_id"] != user for t in body):
                            rls_ok = False
                for i, user in enumerate(picks_u):
                    q, r, rows = req.request("service_role", None, ADMISSION, (user,))
                    if i >= 50:
                        samples["admission"][form]["query"].append(q)
                        samples["admission"][form]["request"].append(r)
                        if not rows[0][0].get("admitted"):
                            raise RuntimeError(f"admission refused at scale: {rows[0][0]}")
                if round_no == 0:
                    thread, owner = long_threads[0]
                    plans[form] = {
                        "last_50_messages": _plan(req.request("authenticated", owner, LAST_MESSAGES, (thread,), explain=True)[2]),
                        "latest_20_threads": _plan(req.request("authenticated", owner, LATEST_THREADS, (), explain=True)[2]),
                        "admission": _plan(req.request("service_role", None, ADMISSION, (users[0],), explain=True)[2]),
                    }
                log(f"    round {round_no + 1}, {form} policies: done")
    finally:
        req.close()
        _set_policies(url, wrapped)  # as migrated
    queries: dict[str, Any] = {}
    for name, by_form in samples.items():
        entry: dict[str, Any] = {}
        for form, kinds in by_form.items():
            entry[form] = {"query_ms": summary(kinds["query"], 3), "request_ms": summary(kinds["request"], 3),
                           "plan": plans.get(form, {}).get(name)}
        w, nv = entry["wrapped"]["query_ms"], entry["naive"]["query_ms"]
        entry["naive_over_wrapped"] = {k: round(nv[k] / w[k], 2) for k in ("p50", "p95") if w[k] and nv[k]}
        entry["rows_returned_mean"] = round(sum(rows_seen[name]) / len(rows_seen[name]), 1) if rows_seen[name] else None
        queries[name] = entry
    return {"iterations_per_form": iterations, "queries": queries, "rls_scoped_results": rls_ok,
            "policies": {"wrapped": {f"{t}.{p}": q for (t, p), q in wrapped.items()},
                         "naive": {f"{t}.{p}": q for (t, p), q in NAIVE.items()}}}


def _plan(rows: list[tuple]) -> list[str]:
    return [r[0] for r in rows][:40]


def run(cluster: BenchCluster, dbname: str, threads: int, iterations: int, log: Any = print) -> dict[str, Any]:
    url = cluster.url(dbname)
    started = time.monotonic()
    loaded = load(url, threads, log)
    log(f"    loaded {loaded['counts']} in {time.monotonic() - started:.0f} s")
    result = measure(url, iterations, log)
    result["data"] = loaded
    return result
