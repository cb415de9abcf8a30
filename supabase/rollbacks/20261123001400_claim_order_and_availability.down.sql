-- Rolls back 20261123001400_claim_order_and_availability.sql: claim_runs as in 20261123001300.
begin;

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

drop function public.assistant_user_is_guest(uuid);

delete from supabase_migrations.schema_migrations where version = '20261123001400';
commit;
