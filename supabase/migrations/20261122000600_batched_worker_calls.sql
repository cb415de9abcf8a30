-- Fewer round trips and row versions per reply, and one lock order for usage counters.
--
-- complete_runs: a worker that finishes many replies at once hands them over in one call (one
-- transaction) instead of one call each. claim_runs (replaced): admission takes the counters of
-- the claimed runs' users in user order, as complete_runs does, so concurrent claims and
-- completions of a user's runs queue up instead of deadlocking; and the run is marked admitted by
-- the claim's own update instead of a second one.

-------------------------------------------------------------------------------------------------
-- complete_runs: complete_run for each element of p_runs, in one transaction. Each element is an
-- object with complete_run's arguments without their p_ prefix ({"run_id", "attempt",
-- "content", "model", "provider", "prediction_id", "input_tokens", "output_tokens", "cost_usd",
-- "latency_ms", "metadata", "follow_ups", "actions", "time_to_first_token_ms"}). Returns one row
-- per element: the run and its reply id (null when the run was cancelled meanwhile). Any error
-- (a run deleted meanwhile, an empty reply) fails the whole call and changes nothing: the caller
-- then completes the runs one by one with complete_run, which says which one is at fault.
-------------------------------------------------------------------------------------------------
create function public.complete_runs(p_runs jsonb)
returns table (run_id uuid, reply_id uuid)
language plpgsql
set search_path = ''
as $$
declare
  item jsonb;
begin
  if jsonb_typeof(p_runs) is distinct from 'array' or jsonb_array_length(p_runs) not between 1 and 200 then
    raise exception 'p_runs must be an array of 1 to 200 runs' using errcode = '22023';
  end if;
  if exists (select 1 from jsonb_array_elements(p_runs) e where jsonb_typeof(e.value) <> 'object'
                                                             or e.value ->> 'run_id' is null) then
    raise exception 'every element of p_runs must be an object with a run_id' using errcode = '22023';
  end if;

  -- In user order: usage counters are locked the same way by every claim and completion.
  for item in
    select e.value
      from jsonb_array_elements(p_runs) with ordinality e
      left join public.assistant_runs r on r.id = (e.value ->> 'run_id')::uuid
     order by r.user_id nulls first, r.id, e.ordinality
  loop
    run_id := (item ->> 'run_id')::uuid;
    reply_id := public.complete_run(
      p_run_id => run_id,
      p_attempt => (item ->> 'attempt')::integer,
      p_content => item ->> 'content',
      p_model => item ->> 'model',
      p_provider => coalesce(item ->> 'provider', 'replicate'),
      p_prediction_id => item ->> 'prediction_id',
      p_input_tokens => (item ->> 'input_tokens')::integer,
      p_output_tokens => (item ->> 'output_tokens')::integer,
      p_cost_usd => (item ->> 'cost_usd')::numeric,
      p_latency_ms => (item ->> 'latency_ms')::integer,
      p_metadata => coalesce(item -> 'metadata', '{}'::jsonb),
      p_follow_ups => coalesce(item -> 'follow_ups', '[]'::jsonb),
      p_actions => coalesce(item -> 'actions', '[]'::jsonb),
      p_time_to_first_token_ms => (item ->> 'time_to_first_token_ms')::integer);
    return next;
  end loop;
end
$$;

-------------------------------------------------------------------------------------------------
-- claim_runs, as in 20261122000400 with two changes: the claimed runs are admitted in user order,
-- and admitted_at is set by the claiming update (cleared again if the run is refused).
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
  history jsonb,
  plan_id text,
  uses_own_key boolean,
  assistant jsonb,
  profile jsonb,
  blocked_code text
)
language plpgsql
set search_path = ''
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
           select jsonb_agg(jsonb_build_object('role', h.role, 'content', h.content, 'image_url', h.image_url)
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
         ), '[]'::jsonb),
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
         null::timestamptz, '[]'::jsonb, null::text, false, null::jsonb, null::jsonb, r.last_error_code
    from public.assistant_runs r
   where r.id = any(blocked);
end
$$;

revoke execute on function public.complete_runs(jsonb) from public, anon, authenticated;
grant execute on function public.complete_runs(jsonb) to service_role;
