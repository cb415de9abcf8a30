-- Rolls back 20261123001300_in_flight_reservations.sql: admit_request and claim_runs as in
-- 20261122000700 and 20261123000100, and no reservations.
begin;

create or replace function public.admit_request(p_user_id uuid, p_vision boolean default false) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  plan public.ai_plans;
  deltas jsonb := jsonb_build_object('messages', 1, 'vision_messages', case when p_vision then 1 else 0 end,
                                     'requests', 1);
  refusal jsonb;
begin
  select * into plan from public.ai_plans where id = public.ai_plan_of(p_user_id);
  if plan.id is null then
    return jsonb_build_object('admitted', false, 'reason', 'unknown_plan', 'plan', public.ai_plan_of(p_user_id));
  end if;
  if plan.uses_own_key and not exists (select 1 from public.user_replicate_tokens k where k.user_id = p_user_id) then
    return jsonb_build_object('admitted', false, 'reason', 'byok_token_missing', 'plan', plan.id);
  end if;

  if exists (select 1 from public.ai_plan_limits l where l.plan_id = plan.id and l.limit_value is not null) then
    -- This user's rows of the current windows, created if new and locked in window order (the
    -- order ai_usage_add writes them in, so an admission and a completion of one user never wait
    -- for each other in a cycle). Concurrent admissions wait here; each then reads the counts its
    -- predecessor committed.
    insert into public.ai_usage_windows (user_id, time_window, window_start)
    select p_user_id, w.w, public.ai_window_start(w.w)
      from unnest(array['hour', 'day', 'week', 'month']) with ordinality w (w, n)
     order by w.n
    on conflict do nothing;

    perform 1
       from unnest(array['hour', 'day', 'week', 'month']) with ordinality w (w, n)
       join public.ai_usage_windows u
         on u.user_id = p_user_id and u.time_window = w.w and u.window_start = public.ai_window_start(w.w)
      order by w.n
        for update of u;

    with limits as (
      select l.metric, l.time_window, l.limit_value, public.ai_window_start(l.time_window) as window_start,
             coalesce((deltas ->> l.metric)::numeric, 0) as delta
        from public.ai_plan_limits l
       where l.plan_id = plan.id and l.limit_value is not null
    ), usage as (
      select l.*, case l.metric when 'messages' then w.messages when 'vision_messages' then w.vision_messages
                                when 'requests' then w.requests when 'tokens' then w.tokens
                                when 'cost_usd' then w.cost_usd end as used
        from limits l
        join public.ai_usage_windows w
          on w.user_id = p_user_id and w.time_window = l.time_window and w.window_start = l.window_start
    )
    select jsonb_build_object(
             'admitted', false, 'reason', 'limit_reached', 'plan', plan.id, 'metric', u.metric,
             'window', u.time_window, 'limit', u.limit_value, 'used', u.used,
             'resets_at', public.ai_window_end(u.time_window, u.window_start))
      into refusal
      from usage u
     where (u.delta > 0 and u.used + u.delta > u.limit_value)
           -- tokens and cost are counted after the reply: refuse once the limit is reached
           or (u.metric in ('tokens', 'cost_usd') and u.used >= u.limit_value)
     -- The limit that lasts longest decides when the user can write again.
     order by public.ai_window_end(u.time_window, u.window_start) desc
     limit 1;

    if refusal is not null then
      return refusal;
    end if;
  end if;
  perform public.ai_usage_add(p_user_id, deltas);
  return jsonb_build_object('admitted', true, 'plan', plan.id, 'uses_own_key', plan.uses_own_key);
end
$$;


create or replace function public.claim_runs(
  p_worker text,
  p_limit integer default 10,
  p_lease_seconds integer default 120,
  p_chat_model text default null,
  p_vision_model text default null
)
returns table (
  run_id uuid,
  message_id uuid,
  thread_id uuid,
  user_id uuid,
  attempt integer,
  max_attempts integer,
  content text,
  image_url text,
  message_created_at timestamptz,
  history json,
  plan_id text,
  uses_own_key boolean,
  assistant jsonb,
  profile jsonb,
  blocked_code text
)
language plpgsql
set search_path = ''
set plan_cache_mode = force_generic_plan
as $$
declare
  stale uuid;
  claimed record;
  verdict jsonb;
  admitted uuid[] := '{}';
  blocked uuid[] := '{}';
begin
  if p_limit is null or p_limit < 1 or p_limit > 1000 then
    raise exception 'p_limit must be between 1 and 1000 (got %)', p_limit using errcode = '22023';
  end if;
  if p_lease_seconds is null or p_lease_seconds < 5 or p_lease_seconds > 3600 then
    raise exception 'p_lease_seconds must be between 5 and 3600 (got %)', p_lease_seconds using errcode = '22023';
  end if;

  -- Nothing due: two index probes, not the whole claim. (A run another claim has locked and not
  -- yet committed still counts as due here; the claim below then skips it.)
  if not exists (select 1 from public.assistant_runs r where r.status = 'queued' and r.next_attempt_at <= now())
     and not exists (select 1 from public.assistant_runs r
                      where r.status = 'in_progress' and r.lease_expires_at <= now()) then
    return;
  end if;

  -- Runs whose worker died: on their last attempt they fail; if their user asked to cancel
  -- them, they end cancelled.
  for stale in
    select r.id from public.assistant_runs r
     where r.status = 'in_progress' and r.lease_expires_at <= now()
       and (r.attempts >= r.max_attempts or r.cancel_requested_at is not null)
     order by r.lease_expires_at
     limit p_limit
     for update skip locked
  loop
    if (select cancel_requested_at from public.assistant_runs where id = stale) is not null then
      perform public.finish_cancelled(stale, null);
    else
      perform public.assistant_finish_failed(stale, 'lease_expired',
        'the lease of the last attempt expired before the run finished');
    end if;
  end loop;

  for claimed in
    -- Two index scans (queued by due time, in progress by lease expiry), each locking only what
    -- it returns; SKIP LOCKED lets concurrent workers take disjoint runs.
    with due_queued as (
      select r.id, r.admitted_at from public.assistant_runs r
       where r.status = 'queued' and r.next_attempt_at <= now()
       order by r.next_attempt_at
       limit p_limit
       for update skip locked
    ), due_expired as (
      select r.id, r.admitted_at from public.assistant_runs r
       where r.status = 'in_progress' and r.lease_expires_at <= now() and r.attempts < r.max_attempts
       order by r.lease_expires_at
       limit p_limit
       for update skip locked
    ), due as (
      select id, admitted_at from due_expired
      union all
      select id, admitted_at from due_queued
      limit p_limit
    ), taken as (
      update public.assistant_runs r
         set status = 'in_progress', attempts = r.attempts + 1, lease_owner = p_worker,
             lease_expires_at = now() + make_interval(secs => p_lease_seconds),
             admitted_at = coalesce(r.admitted_at, now())
        from due where r.id = due.id
      returning r.id, r.user_id, due.admitted_at is null as to_admit,
                (select m.image_url is not null from public.assistant_messages m where m.id = r.message_id) as vision
    )
    select * from taken order by taken.user_id, taken.id
  loop
    if claimed.to_admit then
      verdict := public.admit_request(claimed.user_id, claimed.vision);
      if not (verdict ->> 'admitted')::boolean then
        update public.assistant_runs set admitted_at = null where id = claimed.id;
        perform public.assistant_finish_blocked(claimed.id, verdict,
          case when claimed.vision then p_vision_model else p_chat_model end);
        blocked := blocked || claimed.id;
        continue;
      end if;
    end if;
    admitted := admitted || claimed.id;
  end loop;

  return query
  select r.id, r.message_id, r.thread_id, r.user_id, r.attempts, r.max_attempts,
         m.content, m.image_url, m.created_at,
         coalesce((
           select json_agg(json_build_object('role', h.role, 'content', h.content, 'image_url', h.image_url)
                            order by h.created_at, h.id)
             from (
               select e.role, e.content, e.image_url, e.created_at, e.id
                 from public.assistant_messages e
                where e.thread_id = r.thread_id
                  and (e.created_at, e.id) < (m.created_at, m.id)
                  and not (e.metadata_json ? 'error_code')
                order by e.created_at desc, e.id desc
                limit 50
             ) h
         ), '[]'::json),
         p.id, p.uses_own_key,
         (select to_jsonb(a) - 'created_at' - 'updated_at' from public.assistants a
           where a.id = coalesce(t.assistant_id, public.default_assistant_id())),
         (select jsonb_build_object('goals', f.goals, 'experience_level', f.experience_level,
                                    'preferences', f.preferences)
            from public.ai_profiles f where f.user_id = r.user_id),
         null::text
    from public.assistant_runs r
    join public.assistant_messages m on m.id = r.message_id
    join public.assistant_threads t on t.id = r.thread_id
    join public.ai_plans p on p.id = public.ai_plan_of(r.user_id)
   where r.id = any(admitted);

  -- Runs refused at admission come back too, marked, so the worker can count them; they are
  -- already finished (blocked) and carry nothing to work on.
  return query
  select r.id, r.message_id, r.thread_id, r.user_id, r.attempts, r.max_attempts, null::text, null::text,
         null::timestamptz, '[]'::json, null::text, false, null::jsonb, null::jsonb, r.last_error_code
    from public.assistant_runs r
   where r.id = any(blocked);
end
$$;

revoke execute on function public.claim_runs(text, integer, integer, text, text) from public, anon, authenticated;
grant execute on function public.claim_runs(text, integer, integer, text, text) to service_role;


drop index public.idx_assistant_runs_open_reservations;
alter table public.assistant_runs
  drop constraint assistant_runs_reserved_not_negative,
  drop column reserved_tokens,
  drop column reserved_usd;
alter table public.ai_plans
  drop constraint ai_plans_reserve_not_negative,
  drop column reserve_tokens,
  drop column reserve_usd;

delete from supabase_migrations.schema_migrations where version = '20261123001300';
commit;
