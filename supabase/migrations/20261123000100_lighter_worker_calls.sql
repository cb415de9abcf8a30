-- Less database work per worker call, same results.
--
-- 1. claim_runs returns each run's history as json instead of jsonb: same arguments, same rows,
--    the same JSON. Built with json_agg/json_build_object, the history is text PostgreSQL writes
--    once; as jsonb it was built in binary form (keys sorted and deduplicated) and then printed
--    again. Measured on 50-message histories: about 0.27 ms of database CPU per claimed run as
--    jsonb, 0.20 ms as json. Nothing reads the history in SQL; the worker only parses it.
-- 2. A claim with nothing due returns after two index probes. Every wake-up reaches every worker,
--    so with N workers a message costs N claims, N-1 of them empty; an empty claim went through
--    every statement of the function (measured: 0.61 ms of database CPU, now 0.1 ms).
-- 3. claim_runs, complete_run and complete_runs plan their statements once per session
--    (plan_cache_mode = force_generic_plan). PL/pgSQL statements that use the function's
--    arguments are planned for each call while PostgreSQL judges the generic plan dearer than
--    one planned for the values (a LIMIT taken from p_limit, say), and for these statements it
--    always did: planning cost 0.3-0.4 ms of database CPU per claim call and 0.1 ms per
--    complete_run. The generic plans are the same index scans (checked with backlogs of 100,000
--    and 1,200,000 queued runs beside finished ones: the claim's update still joins by primary
--    key, and claims took as long or less). The setting holds for everything these functions
--    call (admit_request, ai_usage_add, finish_cancelled, ...: primary-key and unique lookups).
--    Plans are made again only when invalidated (after an ANALYZE, say). Measured, a whole
--    message (insert, claim, completion): -15% database CPU one at a time, -8% in batches of 4,
--    -5% in batches of 16.
--
-- A function's result type cannot be changed in place: it is dropped and created again in one
-- transaction, with its grants. Calls take no lock on a function: until the migration commits,
-- claims run the old one. A worker that prepared the call before meets "cached plan must not
-- change result type" once per pooled connection and calls again (worker/store.py).

drop function public.claim_runs(text, integer, integer, text, text);

create function public.claim_runs(
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

alter function public.complete_run(uuid, integer, text, text, text, text, integer, integer, numeric, integer, jsonb,
                                   jsonb, jsonb, integer)
  set plan_cache_mode = force_generic_plan;
alter function public.complete_runs(jsonb) set plan_cache_mode = force_generic_plan;
