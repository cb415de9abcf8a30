-- Token and cost limits hold against a burst: a request in flight holds part of the limit.
--
-- Until now a token or cost limit refused a request only once it was reached: tokens and cost
-- are counted after the reply. Every request admitted before that, and still in flight when the
-- limit was reached, took the user past it: a burst of messages in several threads (up to the
-- queue cap, again and again as runs left the queue) went as far past a token limit as the
-- replies in flight at that moment.
--
-- 1. ai_plans.reserve_tokens and reserve_usd: what each admitted request of the plan holds of
--    its token and cost limits while it is in flight (null: nothing; the plan's limits then
--    refuse only once reached, as before). premium, the default plan with a token limit,
--    reserves 4,000 tokens a request (a typical request with a long reply).
-- 2. assistant_runs.reserved_tokens and reserved_usd: what a run holds, set when it is admitted.
--    Only an open run (queued for a retry, or in progress) holds it: nothing has to give it
--    back, so nothing can forget to (a run that ends, fails, is cancelled or deleted stops
--    holding by its status or by being gone). A partial index finds a user's open holdings.
-- 3. admit_request counts, against each token or cost limit, what the user's open runs hold.
--    A limit reached refuses as before (blocked, with the reply that says when it resets). A
--    limit not reached but that the requests in flight and this one could go past answers
--    `replies_in_flight`: claim_runs puts the run back in the queue for a second without
--    counting the attempt (and returns it marked so, as it returns refused runs, so that the
--    worker claims again then), and admits it once what is used and held leaves room for it (or
--    it is then refused if the replies in flight reached the limit). With nothing in flight a
--    request is always admitted while the limit is not reached, so one reply can still end past
--    it, by what it used beyond its reservation. Plans without token or cost limits, or without
--    reservations, cost nothing more.
-- 4. claim_runs sets the run's reservation when it admits it, and admits each user's runs in the
--    order they were written (it was the order of their ids).
--
-- Left as they are: a waiting run is tried again every second (one claim of a run; at most the
-- user's queue cap of them), and a message written while another waits can be admitted first
-- if a reply ends between the two claims. Deleting a message in flight frees its reservation at
-- once, while its prediction runs until the worker has cancelled it (it is charged then, see
-- 20261123000800).

alter table public.ai_plans
  add column reserve_tokens integer null,
  add column reserve_usd numeric(10, 6) null,
  add constraint ai_plans_reserve_not_negative
    check (coalesce(reserve_tokens, 0) >= 0 and coalesce(reserve_usd, 0) >= 0);

comment on column public.ai_plans.reserve_tokens is
  'Tokens each admitted request holds of the plan''s token limits while it is in flight (null: none).';
comment on column public.ai_plans.reserve_usd is
  'USD each admitted request holds of the plan''s cost limits while it is in flight (null: none).';

update public.ai_plans set reserve_tokens = 4000 where id = 'premium';

alter table public.assistant_runs
  add column reserved_tokens integer not null default 0,
  add column reserved_usd numeric(10, 6) not null default 0,
  add constraint assistant_runs_reserved_not_negative check (reserved_tokens >= 0 and reserved_usd >= 0);

comment on column public.assistant_runs.reserved_tokens is
  'Tokens this request holds of its user''s token limits while it is open (queued or in progress), from its plan at admission.';
comment on column public.assistant_runs.reserved_usd is
  'USD this request holds of its user''s cost limits while it is open (queued or in progress), from its plan at admission.';

create index idx_assistant_runs_open_reservations
  on public.assistant_runs (user_id)
  where status in ('queued', 'in_progress') and (reserved_tokens > 0 or reserved_usd > 0);

-------------------------------------------------------------------------------------------------
-- admit_request, as in 20261122000700, counting what the user's open runs hold.
-------------------------------------------------------------------------------------------------
create or replace function public.admit_request(p_user_id uuid, p_vision boolean default false) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  plan public.ai_plans;
  deltas jsonb := jsonb_build_object('messages', 1, 'vision_messages', case when p_vision then 1 else 0 end,
                                     'requests', 1);
  refusal jsonb;
  reserving boolean := false;
  held_tokens numeric := 0;
  held_usd numeric := 0;
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

    -- What the user's requests in flight hold: with the rows above locked, every admission of
    -- this user before this one has committed, its reservation with it.
    reserving := (coalesce(plan.reserve_tokens, 0) > 0 or coalesce(plan.reserve_usd, 0) > 0)
                 and exists (select 1 from public.ai_plan_limits l
                              where l.plan_id = plan.id and l.limit_value is not null
                                and l.metric in ('tokens', 'cost_usd'));
    if reserving then
      select coalesce(sum(r.reserved_tokens), 0), coalesce(sum(r.reserved_usd), 0)
        into held_tokens, held_usd
        from public.assistant_runs r
       where r.user_id = p_user_id and r.status in ('queued', 'in_progress')
         and (r.reserved_tokens > 0 or r.reserved_usd > 0);
    end if;

    with limits as (
      select l.metric, l.time_window, l.limit_value, public.ai_window_start(l.time_window) as window_start,
             coalesce((deltas ->> l.metric)::numeric, 0) as delta
        from public.ai_plan_limits l
       where l.plan_id = plan.id and l.limit_value is not null
    ), usage as (
      select l.*, case l.metric when 'messages' then w.messages when 'vision_messages' then w.vision_messages
                                when 'requests' then w.requests when 'tokens' then w.tokens
                                when 'cost_usd' then w.cost_usd end as used,
             case l.metric when 'tokens' then held_tokens when 'cost_usd' then held_usd else 0 end as held,
             case l.metric when 'tokens' then coalesce(plan.reserve_tokens, 0)
                           when 'cost_usd' then coalesce(plan.reserve_usd, 0) else 0 end as reserve
        from limits l
        join public.ai_usage_windows w
          on w.user_id = p_user_id and w.time_window = l.time_window and w.window_start = l.window_start
    ), verdicts as (
      select u.*,
             (u.delta > 0 and u.used + u.delta > u.limit_value)
             -- tokens and cost are counted after the reply: refuse once the limit is reached
             or (u.metric in ('tokens', 'cost_usd') and u.used >= u.limit_value) as reached
        from usage u
    )
    select case when v.reached
                then jsonb_build_object(
                       'admitted', false, 'reason', 'limit_reached', 'plan', plan.id, 'metric', v.metric,
                       'window', v.time_window, 'limit', v.limit_value, 'used', v.used,
                       'resets_at', public.ai_window_end(v.time_window, v.window_start))
                -- Not reached, but the requests in flight with this one could go past it: this one
                -- waits for them (claim_runs puts it back in the queue) instead of being refused.
                else jsonb_build_object(
                       'admitted', false, 'reason', 'replies_in_flight', 'plan', plan.id, 'metric', v.metric,
                       'window', v.time_window, 'limit', v.limit_value, 'used', v.used, 'reserved', v.held)
           end
      into refusal
      from verdicts v
     where v.reached or (v.held > 0 and v.used + v.held + v.reserve > v.limit_value)
     -- A limit reached first; of those, the one that lasts longest decides when the user can
     -- write again.
     order by v.reached desc, public.ai_window_end(v.time_window, v.window_start) desc
     limit 1;

    if refusal is not null then
      return refusal;
    end if;
  end if;
  perform public.ai_usage_add(p_user_id, deltas);
  return jsonb_build_object('admitted', true, 'plan', plan.id, 'uses_own_key', plan.uses_own_key,
                            'reserve_tokens', case when reserving then coalesce(plan.reserve_tokens, 0) else 0 end,
                            'reserve_usd', case when reserving then coalesce(plan.reserve_usd, 0) else 0 end);
end
$$;


-------------------------------------------------------------------------------------------------
-- claim_runs, as in 20261123000100: a run told to wait for the user's replies in flight goes
-- back to the queue; an admitted run gets its reservation.
-------------------------------------------------------------------------------------------------
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
  waiting uuid[] := '{}';
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
      returning r.id, r.user_id, r.created_at, due.admitted_at is null as to_admit,
                (select m.image_url is not null from public.assistant_messages m where m.id = r.message_id) as vision
    )
    -- By user (each user's usage rows are locked in one order), then in the order the user
    -- wrote: of two messages, the older is admitted first, the newer waits.
    select * from taken order by taken.user_id, taken.created_at, taken.id
  loop
    if claimed.to_admit then
      verdict := public.admit_request(claimed.user_id, claimed.vision);
      if verdict ->> 'reason' = 'replies_in_flight' then
        -- Back to the queue, this claim not counted as an attempt, for a second: the user's
        -- replies in flight end meanwhile and free what they hold.
        update public.assistant_runs
           set status = 'queued', attempts = attempts - 1, lease_owner = null, lease_expires_at = null,
               admitted_at = null, next_attempt_at = now() + interval '1 second'
         where id = claimed.id;
        waiting := waiting || claimed.id;
        continue;
      end if;
      if not (verdict ->> 'admitted')::boolean then
        update public.assistant_runs set admitted_at = null where id = claimed.id;
        perform public.assistant_finish_blocked(claimed.id, verdict,
          case when claimed.vision then p_vision_model else p_chat_model end);
        blocked := blocked || claimed.id;
        continue;
      end if;
      -- What it holds of a token or cost limit while it is open (see admit_request).
      if (verdict ->> 'reserve_tokens')::numeric > 0 or (verdict ->> 'reserve_usd')::numeric > 0 then
        update public.assistant_runs
           set reserved_tokens = (verdict ->> 'reserve_tokens')::integer,
               reserved_usd = (verdict ->> 'reserve_usd')::numeric
         where id = claimed.id;
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
  -- already finished (blocked) and carry nothing to work on. So do runs put back to wait for
  -- their user's replies in flight (marked `replies_in_flight`), so the worker claims again when
  -- they fall due.
  return query
  select r.id, r.message_id, r.thread_id, r.user_id, r.attempts, r.max_attempts, null::text, null::text,
         null::timestamptz, '[]'::json, null::text, false, null::jsonb, null::jsonb,
         case when r.id = any(waiting) then 'replies_in_flight' else r.last_error_code end
    from public.assistant_runs r
   where r.id = any(blocked) or r.id = any(waiting);
end
$$;

revoke execute on function public.claim_runs(text, integer, integer, text, text) from public, anon, authenticated;
grant execute on function public.claim_runs(text, integer, integer, text, text) to service_role;
