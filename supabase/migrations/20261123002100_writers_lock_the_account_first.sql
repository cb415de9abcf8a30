-- The writers and the claim take the account's key first: deleting an account while one of its
-- replies is written no longer deadlocks.
--
-- Deleting a user (auth.users) locks the account's row first, then deletes, by cascade, its
-- threads, messages, runs, usage and events. A worker's writer (20261123001900: the thread's and
-- the message's keys, then the run) took the account's key last, through the foreign keys of the
-- reply, the event or the usage rows it writes: each waited for the other, and PostgreSQL rolled
-- one back after a second (the user's deletion, or the worker's write, retried).
--
-- 1. assistant_lock_users(user ids, wait): the accounts' keys (`for key share`), in id order.
--    SECURITY DEFINER: `service_role` has no privilege on auth.users on a hosted project, and a
--    row lock needs UPDATE on the table. It runs as the role that applies the migrations
--    (`postgres` on Supabase, which has every privilege on the auth schema's tables); it does
--    nothing else, and only service_role may call it. A key-share lock conflicts only with a
--    deletion of the account and with an update of a column with a unique index (its id, its
--    phone number): sign-ins and most profile updates go on; such an update waits for the write,
--    and a claim skips the account's runs for that moment. The migration first checks that its
--    role may do it (SELECT and UPDATE on auth.users, row level security bypassed), and the
--    function raises rather than let a claim skip an account it cannot see, or a writer go on
--    without its lock.
-- 2. assistant_lock_requests, and so every writer that calls it (complete_runs, fail_attempt,
--    finish_cancelled, cancel_run, release_run, record_abandoned_attempt, the withdrawal
--    trigger), and complete_run inline: the accounts of the runs first, then the threads, the
--    messages and the runs. Whichever of the two comes second now waits for the other, holding
--    nothing: the writer then finds its run gone; the deletion deletes the reply too.
-- 2b. record_cancelled_consumption (20261123000400) and record_orphaned_consumption
--    (20261123000800), which put a prediction's consumption on an event and the user's usage:
--    the account (and the run's thread and message) first too.
-- 3. claim_runs holds runs it locked (SKIP LOCKED) before it knows their accounts, so it cannot
--    wait for one: it takes the accounts of the runs it selected with SKIP LOCKED too
--    (assistant_lock_users(…, false)), before it changes any of them, and leaves the runs of an
--    account being deleted as they are (locked until it commits, unchanged; they go with the
--    deletion). Its selection now ends in arrays, and the update of the runs it takes is by key.
--
-- Left as it was: an operator's delete of several accounts in one statement takes them in the
-- order of its scan, which can cross a completion batch's (accounts in id order).

do $$
begin
  if not (has_table_privilege(current_user, 'auth.users', 'SELECT')
          and has_table_privilege(current_user, 'auth.users', 'UPDATE')) then
    raise exception 'the role applying this migration (%) needs SELECT and UPDATE on auth.users', current_user
      using hint = 'assistant_lock_users locks accounts (for key share) as its owner; Supabase''s postgres role has '
                   'every privilege on the auth schema''s tables: apply the migrations as postgres',
            errcode = '42501';
  end if;
  if (select c.relrowsecurity from pg_class c where c.oid = 'auth.users'::regclass)
     and not (select r.rolbypassrls or r.rolsuper from pg_roles r where r.rolname = current_user) then
    raise exception 'auth.users has row level security and the role applying this migration (%) does not bypass it',
      current_user
      using hint = 'assistant_lock_users must see every account: apply the migrations as a role with BYPASSRLS',
            errcode = '42501';
  end if;
end
$$;

create function public.assistant_lock_users(p_user_ids uuid[], p_wait boolean) returns uuid[]
language plpgsql
security definer
set search_path = ''
as $$
declare
  locked uuid[];
begin
  if p_wait then
    select coalesce(array_agg(u.id), '{}') into locked
      from (select u.id from auth.users u where u.id = any(p_user_ids) order by u.id for key share) u;
  else  -- the accounts being deleted are skipped (and left out of the answer)
    select coalesce(array_agg(u.id), '{}') into locked
      from (select u.id from auth.users u where u.id = any(p_user_ids) order by u.id for key share skip locked) u;
  end if;
  -- An account left out is one being deleted (skipped), or deleted: its requests are gone with
  -- it. Unless this role cannot see the accounts at all (row level security it does not bypass):
  -- then a claim would leave their runs for ever, and the writers would lose their lock order.
  if cardinality(locked) < cardinality(p_user_ids)
     and (select c.relrowsecurity from pg_class c where c.oid = 'auth.users'::regclass)
     and not (select r.rolbypassrls or r.rolsuper from pg_roles r where r.rolname = current_user) then
    raise exception 'assistant_lock_users cannot see the accounts: row level security on auth.users hides them from %',
      current_user
      using errcode = '42501',
            hint = 'its owner must read every row of auth.users: make it a role with BYPASSRLS (as Supabase''s postgres)';
  end if;
  return locked;
end
$$;

revoke execute on function public.assistant_lock_users(uuid[], boolean) from public, anon, authenticated;
grant execute on function public.assistant_lock_users(uuid[], boolean) to service_role;

create or replace function public.assistant_lock_requests(p_run_ids uuid[]) returns void
language plpgsql
set search_path = ''
as $$
begin
  perform public.assistant_lock_users(
    array(select r.user_id from public.assistant_runs r where r.id = any(p_run_ids)), true);
  -- `= any(array(…))`: an index scan of each table by its key, for a few rows or a batch. (With
  -- `in (select …)`, the generic plan joined a whole table's scan to the runs whenever the
  -- table was small enough for that to look cheaper: a scan per completion as the table grew.)
  perform 1 from public.assistant_threads t
   where t.id = any(array(select r.thread_id from public.assistant_runs r where r.id = any(p_run_ids)))
   order by t.id
     for key share;
  perform 1 from public.assistant_messages m
   where m.id = any(array(select r.message_id from public.assistant_runs r where r.id = any(p_run_ids)))
   order by m.id
     for key share;
end
$$;

create or replace function public.complete_run(
  p_run_id uuid,
  p_attempt integer,
  p_content text,
  p_model text,
  p_provider text default 'replicate',
  p_prediction_id text default null,
  p_input_tokens integer default null,
  p_output_tokens integer default null,
  p_cost_usd numeric default null,
  p_latency_ms integer default null,
  p_metadata jsonb default '{}'::jsonb,
  p_follow_ups jsonb default '[]'::jsonb,
  p_actions jsonb default '[]'::jsonb,
  p_time_to_first_token_ms integer default null
) returns uuid
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
  reply_id uuid;
  body text := coalesce(p_content, '');
  metadata jsonb := coalesce(p_metadata, '{}'::jsonb);
begin
  -- The account, thread and message before the run: assistant_lock_requests, inlined for one run.
  perform public.assistant_lock_users(
    array(select r.user_id from public.assistant_runs r where r.id = p_run_id), true);
  perform 1 from public.assistant_threads t
   where t.id = (select r.thread_id from public.assistant_runs r where r.id = p_run_id)
     for key share;
  perform 1 from public.assistant_messages m
   where m.id = (select r.message_id from public.assistant_runs r where r.id = p_run_id)
     for key share;
  select * into run from public.assistant_runs where id = p_run_id for update;
  if not found then
    raise exception 'run % not found', p_run_id using errcode = 'P0002';
  end if;
  if run.status not in ('queued', 'in_progress') then
    -- The reply only if it is this attempt's (this call again, its answer lost on the way); null
    -- if the run ended otherwise (see 5).
    if exists (select 1 from public.assistant_inference_events e
                where e.run_id = p_run_id and e.attempt = p_attempt and e.status = 'succeeded') then
      select id into reply_id from public.assistant_messages where reply_to = run.message_id;
    end if;
    return reply_id;
  end if;
  if run.cancel_requested_at is not null then
    -- The user cancelled while the answer was on its way: no reply, but what the prediction
    -- consumed is recorded and counted.
    perform public.finish_cancelled(p_run_id, jsonb_build_object(
      'attempt', p_attempt, 'model', p_model, 'provider', p_provider, 'prediction_id', p_prediction_id,
      'input_tokens', p_input_tokens, 'output_tokens', p_output_tokens, 'cost_usd', p_cost_usd,
      'latency_ms', p_latency_ms));
    return null;
  end if;
  if char_length(btrim(body)) = 0 then
    raise exception 'a reply cannot be empty' using errcode = '22023';
  end if;
  if char_length(body) > 8000 then
    metadata := metadata || jsonb_build_object('truncated', true, 'original_length', char_length(body));
    body := left(body, 8000);
  end if;

  -- Tokens and cost count against the user's limits once: this branch runs once per run. Before
  -- the reply: the user's usage rows are locked before the thread's row (which the reply's
  -- insert updates), in the order claim_runs takes them when it refuses a run with a reply.
  perform public.ai_usage_add(run.user_id, jsonb_build_object(
    'tokens', coalesce(p_input_tokens, 0) + coalesce(p_output_tokens, 0), 'cost_usd', coalesce(p_cost_usd, 0)));

  insert into public.assistant_messages
    (thread_id, user_id, role, content, reply_to, model, token_count, latency_ms, metadata_json)
  values
    (run.thread_id, run.user_id, 'assistant', body, run.message_id, p_model, p_output_tokens, p_latency_ms, metadata)
  on conflict (reply_to) do nothing
  returning id into reply_id;
  if reply_id is null then
    select id into reply_id from public.assistant_messages where reply_to = run.message_id;
  end if;

  insert into public.assistant_inference_events
    (user_id, thread_id, message_id, run_id, attempt, provider, model, prediction_id, status,
     latency_ms, input_tokens, output_tokens, cost_estimate_usd, time_to_first_token_ms)
  values
    (run.user_id, run.thread_id, run.message_id, run.id, p_attempt, p_provider, p_model, p_prediction_id,
     'succeeded', p_latency_ms, p_input_tokens, p_output_tokens, p_cost_usd, p_time_to_first_token_ms)
  on conflict (run_id, attempt) where run_id is not null do nothing;

  insert into public.assistant_follow_ups (user_id, thread_id, message_id, position, suggestion)
  select run.user_id, run.thread_id, reply_id, f.ordinality, left(btrim(f.value), 300)
    from jsonb_array_elements_text(case when jsonb_typeof(p_follow_ups) = 'array' then p_follow_ups else '[]' end)
         with ordinality f
   where f.ordinality <= 3 and btrim(f.value) <> ''
  on conflict (message_id, position) do nothing;

  insert into public.assistant_action_requests (user_id, thread_id, message_id, action_type, payload)
  select run.user_id, run.thread_id, reply_id, a.value ->> 'type', coalesce(a.value -> 'payload', '{}'::jsonb)
    from jsonb_array_elements(case when jsonb_typeof(p_actions) = 'array' then p_actions else '[]' end) a
   where exists (select 1 from public.assistant_action_types t where t.name = a.value ->> 'type')
     and jsonb_typeof(coalesce(a.value -> 'payload', '{}'::jsonb)) = 'object';

  update public.assistant_runs
     set status = 'completed', lease_owner = null, lease_expires_at = null, finished_at = now()
   where id = p_run_id;
  return reply_id;
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
  claimed record;
  ending record;
  accounts uuid[] := '{}';         -- the accounts whose keys this claim holds (see the header)
  candidate_users uuid[] := '{}';
  due_ids uuid[] := '{}';          -- the due runs selected (then: of the accounts held), their
  due_admitted timestamptz[] := '{}';  -- admission times,
  fresh_ids uuid[] := '{}';        -- and those not admitted before
  verdict jsonb;
  admitted uuid[] := '{}';
  blocked uuid[] := '{}';
  waiting uuid[] := '{}';
  -- Runs this claim ends, with a reply (and so the thread's row), after every admission (20261123001700, 1).
  end_ids uuid[] := '{}';
  end_kinds text[] := '{}';       -- stale, unavailable, blocked
  end_verdicts jsonb[] := '{}';   -- blocked: admit_request's verdict
  end_vision boolean[] := '{}';
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
  -- them, they end cancelled. Locked here, ended below.
  select coalesce(array_agg(s.id), '{}'), coalesce(array_agg(s.user_id), '{}') into end_ids, candidate_users
    from (select r.id, r.user_id from public.assistant_runs r
            join public.assistant_threads t on t.id = r.thread_id
            join public.assistant_messages m on m.id = r.message_id
           where r.status = 'in_progress' and r.lease_expires_at <= now()
             and (r.attempts >= r.max_attempts or r.cancel_requested_at is not null)
           order by r.lease_expires_at
           limit p_limit
           for update of r skip locked
           for key share of t, m skip locked) s;  -- the thread and message too: see 20261123001900, 2
  if cardinality(end_ids) > 0 then
    -- Their accounts too, skipping those being deleted; a run of such an account is left as it
    -- is (locked, unchanged) and goes with the delete.
    accounts := public.assistant_lock_users(candidate_users, false);
    end_ids := array(select x.id from unnest(end_ids, candidate_users) x (id, user_id)
                      where x.user_id = any(accounts));
  end if;
  end_kinds := array_fill('stale'::text, array[cardinality(end_ids)]);
  if cardinality(end_ids) > 0 then  -- ended below: already holding nothing for the admissions (20261123001700, 1)
    update public.assistant_runs set reserved_tokens = 0, reserved_usd = 0
     where id = any(end_ids) and (reserved_tokens > 0 or reserved_usd > 0);
  end if;
  end_verdicts := array_fill(null::jsonb, array[cardinality(end_ids)]);
  end_vision := array_fill(false, array[cardinality(end_ids)]);

  -- Two index scans (queued by due time, in progress by lease expiry), each locking only what it
  -- returns; SKIP LOCKED lets concurrent workers take disjoint runs.
  with due_queued as (
    select r.id, r.user_id, r.admitted_at from public.assistant_runs r
      join public.assistant_threads t on t.id = r.thread_id
      join public.assistant_messages m on m.id = r.message_id
     where r.status = 'queued' and r.next_attempt_at <= now()
     order by r.next_attempt_at
     limit p_limit
     for update of r skip locked
     for key share of t, m skip locked  -- see 20261123001900, 2
  ), due_expired as (
    select r.id, r.user_id, r.admitted_at from public.assistant_runs r
      join public.assistant_threads t on t.id = r.thread_id
      join public.assistant_messages m on m.id = r.message_id
     where r.status = 'in_progress' and r.lease_expires_at <= now() and r.attempts < r.max_attempts
       and r.cancel_requested_at is null  -- ended above, never a new attempt (20261123001600, 3)
     order by r.lease_expires_at
     limit p_limit
     for update of r skip locked
     for key share of t, m skip locked  -- see 20261123001900, 2
  ), due as (
    select e.id, e.user_id, e.admitted_at from due_expired e
    union all
    select q.id, q.user_id, q.admitted_at from due_queued q
    limit p_limit
  )
  select coalesce(array_agg(due.id), '{}'), coalesce(array_agg(due.user_id), '{}'),
         coalesce(array_agg(due.admitted_at), '{}')
    into due_ids, candidate_users, due_admitted
    from due;
  if cardinality(due_ids) > 0 then  -- their accounts, as above for the runs this claim ends
    accounts := accounts || public.assistant_lock_users(
      array(select u from unnest(candidate_users) u where u <> all(accounts)), false);
    fresh_ids := array(select x.id from unnest(due_ids, due_admitted) x (id, admitted_at) where x.admitted_at is null);
    due_ids := array(select x.id from unnest(due_ids, candidate_users) x (id, user_id) where x.user_id = any(accounts));
  end if;

  for claimed in
    with taken as (
      update public.assistant_runs r
         set status = 'in_progress', attempts = r.attempts + 1, lease_owner = p_worker,
             lease_expires_at = now() + make_interval(secs => p_lease_seconds),
             admitted_at = coalesce(r.admitted_at, now()),
             last_error_code = nullif(r.last_error_code, 'replies_in_flight')
       where r.id = any(due_ids)  -- by key: an index scan whatever the table's size
      returning r.id, r.user_id, r.created_at, r.attempts, r.id = any(fresh_ids) as to_admit,
                (select m.image_url is not null from public.assistant_messages m where m.id = r.message_id) as vision,
                -- Its assistant is withdrawn from its user: inactive, or members-only and the user a guest.
                (select not a.is_active or (a.offered_to = 'members' and public.assistant_user_is_guest(r.user_id))
                   from public.assistant_threads t
                   join public.assistants a on a.id = t.assistant_id
                  where t.id = r.thread_id) as unavailable
    )
    -- By user (each user's usage rows are locked in one order), then in the order the user
    -- wrote: of two messages, the older is admitted first, the newer waits.
    select * from taken order by taken.user_id, taken.created_at, taken.id
  loop
    if claimed.unavailable then  -- ended below, holding nothing meanwhile
      update public.assistant_runs
         set admitted_at = case when claimed.to_admit then null else admitted_at end,
             reserved_tokens = 0, reserved_usd = 0
       where id = claimed.id;
      end_ids := end_ids || claimed.id;
      end_kinds := end_kinds || 'unavailable'::text;
      end_verdicts := end_verdicts || null::jsonb;
      end_vision := end_vision || false;
      continue;
    end if;
    if claimed.to_admit then
      -- Behind an older request of its user that waits for the replies in flight (marked so,
      -- due or not, claimed by another claim or not): it waits too, so that the older one is
      -- admitted first (20261123001600, 2).
      if exists (select 1 from public.assistant_runs w
                  where w.user_id = claimed.user_id and w.status = 'queued' and w.last_error_code = 'replies_in_flight'
                    and (w.created_at, w.id) < (claimed.created_at, claimed.id)) then
        verdict := jsonb_build_object('admitted', false, 'reason', 'replies_in_flight');
      else
        verdict := public.admit_request(claimed.user_id, claimed.vision);
      end if;
      if verdict ->> 'reason' = 'replies_in_flight' then
        -- Back to the queue, this claim not counted as an attempt, for a second: the user's
        -- replies in flight end meanwhile and free what they hold.
        update public.assistant_runs
           set status = 'queued', attempts = attempts - 1, lease_owner = null, lease_expires_at = null,
               admitted_at = null, next_attempt_at = now() + interval '1 second',
               last_error_code = 'replies_in_flight'
         where id = claimed.id;
        waiting := waiting || claimed.id;
        continue;
      end if;
      if not (verdict ->> 'admitted')::boolean then  -- ended below
        update public.assistant_runs set admitted_at = null where id = claimed.id;
        end_ids := end_ids || claimed.id;
        end_kinds := end_kinds || 'blocked'::text;
        end_verdicts := end_verdicts || verdict;
        end_vision := end_vision || claimed.vision;
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

  -- Every admission done (the usage rows locked, user by user), the runs this claim ends get
  -- their reply, which updates the thread's row: usage rows before threads' rows, as
  -- complete_run and complete_runs take them (20261123000500), and threads in one order, as
  -- complete_runs writes its replies (20261123001900, 3).
  for ending in  -- (nothing to read when nothing ends, as in almost every claim)
    select x.id, x.kind, x.verdict, x.vision, r.attempts, r.cancel_requested_at is not null as cancel_requested
      from unnest(end_ids, end_kinds, end_verdicts, end_vision) x (id, kind, verdict, vision)
      join public.assistant_runs r on r.id = x.id
     where cardinality(end_ids) > 0
     order by r.thread_id, r.id
  loop
    if ending.kind = 'stale' then
      if ending.cancel_requested then
        perform public.finish_cancelled(ending.id, null);
      else
        perform public.assistant_finish_failed(ending.id, 'lease_expired',
          'the lease of the last attempt expired before the run finished');
      end if;
      blocked := blocked || ending.id;  -- returned, marked
    elsif ending.kind = 'unavailable' then
      -- As assistants_after_withdrawal ends a queued run (20261123001000), for this attempt.
      insert into public.assistant_inference_events
        (user_id, thread_id, message_id, run_id, attempt, provider, model, status, error_code)
      select r.user_id, r.thread_id, r.message_id, r.id, ending.attempts, 'replicate', 'not_started',
             'failed', 'assistant_unavailable'
        from public.assistant_runs r where r.id = ending.id
      on conflict do nothing;  -- (run_id, attempt): a column name here would be this function's output column
      perform public.assistant_finish_failed(ending.id, 'assistant_unavailable',
        'the assistant of the thread is no longer offered to its user');
      blocked := blocked || ending.id;
    else
      perform public.assistant_finish_blocked(ending.id, ending.verdict,
        case when ending.vision then p_vision_model else p_chat_model end);
      blocked := blocked || ending.id;
    end if;
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

  -- The runs this claim ended come back too, marked with their error code, so the worker can
  -- count them and stop an attempt of its own it still has: refused at admission
  -- (blocked), failed as assistant_unavailable or lease_expired, or cancelled; they carry nothing
  -- to work on. So do runs put back to wait for their user's replies in flight (marked
  -- `replies_in_flight`), so the worker claims again when they fall due.
  return query
  select r.id, r.message_id, r.thread_id, r.user_id, r.attempts, r.max_attempts, null::text, null::text,
         null::timestamptz, '[]'::json, null::text, false, null::jsonb, null::jsonb,
         case when r.id = any(waiting) then 'replies_in_flight' else r.last_error_code end
    from public.assistant_runs r
   where r.id = any(blocked) or r.id = any(waiting);
end
$$;

create or replace function public.record_cancelled_consumption(p_run_id uuid, p_consumed jsonb) returns boolean
language plpgsql
set search_path = ''
as $$
declare
  event_user uuid;
  tokens integer;
  cost numeric;
begin
  if p_consumed is null or jsonb_typeof(p_consumed) <> 'object'
     or coalesce(p_consumed ->> 'prediction_id', '') = '' or (p_consumed ->> 'attempt') is null then
    raise exception 'p_consumed must be an object with attempt and prediction_id'
      using errcode = '22023', hint = 'pass what the cancelled prediction consumed, as finish_cancelled takes it';
  end if;
  -- The run's account, thread and message before the event's row and the usage rows (see 2b).
  perform public.assistant_lock_requests(array[p_run_id]);
  update public.assistant_inference_events e
     set prediction_id = p_consumed ->> 'prediction_id',
         model = coalesce(p_consumed ->> 'model', e.model),
         latency_ms = coalesce((p_consumed ->> 'latency_ms')::integer, e.latency_ms),
         input_tokens = (p_consumed ->> 'input_tokens')::integer,
         output_tokens = (p_consumed ->> 'output_tokens')::integer,
         cost_estimate_usd = (p_consumed ->> 'cost_usd')::numeric
   where e.run_id = p_run_id and e.attempt = (p_consumed ->> 'attempt')::integer
     and e.status = 'cancelled' and e.prediction_id is null
  returning e.user_id into event_user;
  if not found then
    return false;
  end if;
  tokens := coalesce((p_consumed ->> 'input_tokens')::integer, 0) + coalesce((p_consumed ->> 'output_tokens')::integer, 0);
  cost := coalesce((p_consumed ->> 'cost_usd')::numeric, 0);
  if tokens > 0 or cost > 0 then
    perform public.ai_usage_add(event_user, jsonb_build_object('tokens', tokens, 'cost_usd', cost));
  end if;
  return true;
end
$$;

create or replace function public.record_orphaned_consumption(p_run_id uuid, p_user_id uuid, p_consumed jsonb) returns boolean
language plpgsql
set search_path = ''
as $$
declare
  prediction text := p_consumed ->> 'prediction_id';
  tokens integer;
  cost numeric;
begin
  if p_run_id is null or p_user_id is null or p_consumed is null or jsonb_typeof(p_consumed) <> 'object'
     or coalesce(prediction, '') = '' or (p_consumed ->> 'attempt') is null then
    raise exception 'p_run_id, p_user_id and p_consumed (an object with attempt and prediction_id) are required'
      using errcode = '22023', hint = 'pass what the prediction consumed, as finish_cancelled takes it';
  end if;
  perform public.assistant_lock_users(array[p_user_id], true);  -- the account first (see 2b)
  if exists (select 1 from public.assistant_runs where id = p_run_id)
     or not exists (select 1 from auth.users where id = p_user_id) then
    return false;  -- the run's own functions record it; or there is nobody left to charge
  end if;
  perform pg_advisory_xact_lock(hashtextextended('record_orphaned_consumption:' || prediction, 0));
  if exists (select 1 from public.assistant_inference_events e where e.run_id is null and e.prediction_id = prediction) then
    return false;  -- recorded already, by a reply written before the run was deleted or an earlier call
  end if;
  tokens := coalesce((p_consumed ->> 'input_tokens')::integer, 0) + coalesce((p_consumed ->> 'output_tokens')::integer, 0);
  cost := coalesce((p_consumed ->> 'cost_usd')::numeric, 0);
  insert into public.assistant_inference_events
    (user_id, thread_id, attempt, provider, model, prediction_id, status, latency_ms,
     input_tokens, output_tokens, cost_estimate_usd, error_code)
  values
    (p_user_id, (select t.id from public.assistant_threads t
                  where t.id = (p_consumed ->> 'thread_id')::uuid and t.user_id = p_user_id),
     (p_consumed ->> 'attempt')::integer, coalesce(p_consumed ->> 'provider', 'replicate'),
     coalesce(p_consumed ->> 'model', 'unknown'), prediction, 'cancelled', (p_consumed ->> 'latency_ms')::integer,
     (p_consumed ->> 'input_tokens')::integer, (p_consumed ->> 'output_tokens')::integer,
     (p_consumed ->> 'cost_usd')::numeric, 'request_deleted');
  if tokens > 0 or cost > 0 then
    perform public.ai_usage_add(p_user_id, jsonb_build_object('tokens', tokens, 'cost_usd', cost));
  end if;
  return true;
end
$$;

-- `create or replace` resets the function's settings: as in 20261123000500.
alter function public.complete_run(uuid, integer, text, text, text, text, integer, integer, numeric, integer, jsonb,
                                   jsonb, jsonb, integer)
  set plan_cache_mode = force_generic_plan;
