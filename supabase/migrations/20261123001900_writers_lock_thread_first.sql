-- A user's delete of a thread or a message no longer deadlocks with the worker writing to one of
-- its requests (left open by 20261123001800), and claim_runs returns every run it ends.
--
-- 1. Every function that locks a run and then writes a row referring to its thread and message
--    (a reply, an inference event: their foreign keys take the thread's and the message's keys)
--    now takes those keys first, through assistant_lock_requests (complete_run inline): the
--    thread's, then the message's, then the run, the order in which a delete takes them (the thread, by cascade its
--    messages, by cascade their runs). Before, a delete of the thread that came while a reply
--    was being written (or a delete of the message, for every writer but complete_run and
--    complete_runs, fixed in 001800) waited for the run while the writer waited for the thread
--    or the message: PostgreSQL rolled one of the two back after a second, the user's delete or
--    the worker's write. Now the one that comes second waits: a writer then finds its run gone
--    ("run not found", or false, as for a run deleted earlier), a delete deletes the reply too.
--    These are complete_run, complete_runs, fail_attempt, finish_cancelled, cancel_run,
--    release_run, record_abandoned_attempt and the trigger that ends the queued runs of a
--    withdrawn assistant. `for key share` waits only for a delete (or a change of the key):
--    neither a user's insert into the thread nor a change of its title waits or is waited for.
-- 2. claim_runs finds its runs with SKIP LOCKED and holds them while it admits and ends them, so
--    it cannot wait for their threads and messages: it now takes their keys with the runs, with
--    SKIP LOCKED too, and leaves a run whose thread or message a delete holds (it goes with the
--    delete; if the delete fails, the next claim takes it). Before, the claim waited for them,
--    holding the run the delete waited for: when it wrote the reply of a run it ended, and
--    whenever it changed a run it had taken a second time in the same transaction (to put it
--    back to wait, to end it, to mark what it holds of a limit: a row this transaction already
--    changed has its foreign keys checked again, the thread's and the message's keys taken).
-- 3. Replies are written in the order of their threads, by complete_runs and by claim_runs: both
--    had written them in the order of their users' runs, and a claim that ended two runs of a
--    user in two threads could wait for a completion batch's reply in one thread while the batch
--    waited for the claim's in the other (a deadlock; the loser was retried).
-- 4. claim_runs returns the runs whose last lease expired that it ends, marked `lease_expired`
--    (or `cancelled` when their user had asked to cancel them), as it returns the runs it ends
--    as blocked or assistant_unavailable: the worker counts them (`assistant_runs_failed_total`
--    and `assistant_runs_cancelled_total` missed them) and stops an attempt of its own it still
--    has, where only its lease keeper noticed, up to a third of a lease later. The attempt of a
--    run ended cancelled so has its number taken by the run's cancelled event:
--    record_abandoned_attempt now puts what its prediction consumed on that event and the
--    user's usage, as record_cancelled_consumption does for a cancelled run (it recorded nothing).
-- 5. complete_run and complete_runs answer a run's reply only when it is the reply of the
--    attempt that calls (written now, or by the same call before, its answer lost on the way),
--    and null when the run ended otherwise. They answered whatever reply the run had: the notice
--    of a run failed meanwhile (its last lease expired while this attempt's reply was on its
--    way), or another attempt's reply, and the worker counted a completed run that was not one.
-- 6. Found by a review of the above. The trigger that ends the queued runs of a withdrawn
--    assistant locks them all (after their threads and messages) before it writes the first
--    reply, and writes the replies in thread order: it had locked each run as its loop fetched
--    it, between replies, in run order (a deadlock with a completion batch or a claim writing in
--    two of the same threads). fail_attempt answers `cancelled` to a repeated call only when its
--    own failed event is there: the cancelled event of a run the claim ended (4) made the late
--    call of the stalled attempt answer `cancelled`, and the run was counted twice. Its
--    finish_cancelled, which cannot record its own event under that attempt's number either,
--    puts what its prediction consumed on the claim's cancelled event and the user's usage (it
--    recorded nothing).

-- The threads' and then the messages' keys of these runs, each set in id order: what every
-- writer to a run takes before the run (see 1). Called only by the functions below.
create function public.assistant_lock_requests(p_run_ids uuid[]) returns void
language plpgsql
set search_path = ''
as $$
begin
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

revoke execute on function public.assistant_lock_requests(uuid[]) from public, anon, authenticated;
grant execute on function public.assistant_lock_requests(uuid[]) to service_role;

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
  -- The thread and message before the run (see 1): assistant_lock_requests, inlined for one run.
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

create or replace function public.complete_runs(p_runs jsonb)
returns table (run_id uuid, reply_id uuid)
language plpgsql
set search_path = ''
as $$
#variable_conflict use_column
declare
  invalid boolean;
  ids uuid[];         -- the run of each element, in order
  firsts bigint[];    -- the positions of the elements that count: each run's first
  empty_ids uuid[];   -- runs whose counting element has an empty reply
  missing uuid;
  usage jsonb;
  completed bigint;
  c record;
begin
  if jsonb_typeof(p_runs) is distinct from 'array' or jsonb_array_length(p_runs) not between 1 and 200 then
    raise exception 'p_runs must be an array of 1 to 200 runs' using errcode = '22023';
  end if;
  -- One pass over the elements: their runs, which element counts for each run (its first), and
  -- the runs whose counting element has an empty reply.
  select bool_or(f.bad), array_agg(f.run_id order by f.n),
         coalesce(array_agg(f.n) filter (where f.first), '{}'),
         coalesce(array_agg(f.run_id) filter (where f.first and f.empty), '{}')
    into invalid, ids, firsts, empty_ids
    from (select e.ordinality as n, (e.value ->> 'run_id')::uuid as run_id,
                 jsonb_typeof(e.value) <> 'object' or e.value ->> 'run_id' is null as bad,
                 char_length(btrim(coalesce(e.value ->> 'content', ''))) = 0 as empty,
                 row_number() over (partition by (e.value ->> 'run_id')::uuid order by e.ordinality) = 1 as first
            from jsonb_array_elements(p_runs) with ordinality e) f;
  if invalid then
    raise exception 'every element of p_runs must be an object with a run_id' using errcode = '22023';
  end if;

  perform public.assistant_lock_requests(ids);  -- the threads and messages before the runs
  perform 1 from public.assistant_runs r where r.id = any(ids) order by r.user_id, r.id for update;
  select x.id into missing
    from unnest(ids) with ordinality x (id, n)
   where not exists (select 1 from public.assistant_runs r where r.id = x.id)
   order by x.n
   limit 1;
  if missing is not null then
    raise exception 'run % not found', missing using errcode = 'P0002';
  end if;
  if exists (select 1 from public.assistant_runs r
              where r.id = any(empty_ids) and r.status in ('queued', 'in_progress') and r.cancel_requested_at is null) then
    raise exception 'a reply cannot be empty' using errcode = '22023';
  end if;

  -- What the open runs consumed, per user in user order: counted before their replies are
  -- written, so that the user's usage rows are locked before the thread's row (which a reply's
  -- insert updates), in the order claim_runs takes them when it refuses a run with a reply.
  select jsonb_agg(jsonb_build_object('user_id', u.user_id,
                                      'deltas', jsonb_build_object('tokens', u.tokens, 'cost_usd', u.cost_usd))
                   order by u.user_id)
    into usage
    from (select r.user_id,
                 sum(greatest(coalesce((e.value ->> 'input_tokens')::integer, 0)
                              + coalesce((e.value ->> 'output_tokens')::integer, 0), 0)) as tokens,
                 sum(greatest(coalesce((e.value ->> 'cost_usd')::numeric, 0), 0)) as cost_usd
            from unnest(firsts) f (n)
            join public.assistant_runs r on r.id = ids[f.n]
           cross join lateral (select p_runs -> (f.n - 1)::integer as value) e
           where r.status in ('queued', 'in_progress') and r.cancel_requested_at is null
           group by r.user_id) u;

  -- Tokens and cost count against the user's limits once: these runs are open until now. With
  -- them, in the same user order, the runs cancelled while their answer was on its way (no
  -- reply; finish_cancelled records and counts what was consumed): usage rows are locked in user
  -- order across the whole call, as by every other batch.
  for c in
    select x.user_id, x.run_id, x.value, x.deltas
      from (select (u.value ->> 'user_id')::uuid as user_id, null::uuid as run_id, null::jsonb as value,
                   u.value -> 'deltas' as deltas
              from jsonb_array_elements(coalesce(usage, '[]')) u
            union all
            select r.user_id, r.id, p_runs -> (f.n - 1)::integer, null
              from unnest(firsts) f (n)
              join public.assistant_runs r on r.id = ids[f.n]
             where r.status in ('queued', 'in_progress') and r.cancel_requested_at is not null) x
     order by x.user_id, x.run_id nulls first
  loop
    if c.run_id is null then
      perform public.ai_usage_add(c.user_id, c.deltas);
    else
      perform public.finish_cancelled(c.run_id, jsonb_build_object(
        'attempt', c.value -> 'attempt', 'model', c.value -> 'model',
        'provider', coalesce(c.value -> 'provider', '"replicate"'), 'prediction_id', c.value -> 'prediction_id',
        'input_tokens', c.value -> 'input_tokens', 'output_tokens', c.value -> 'output_tokens',
        'cost_usd', c.value -> 'cost_usd', 'latency_ms', c.value -> 'latency_ms'));
    end if;
  end loop;

  -- Every other run still open gets its reply, event, follow-ups and actions, in one statement.
  with input as (
    select x.*, coalesce(x.content, '') as body
      from unnest(firsts) f (n),
           jsonb_to_record(p_runs -> (f.n - 1)::integer)
             as x (run_id uuid, attempt integer, content text, model text, provider text, prediction_id text,
                   input_tokens integer, output_tokens integer, cost_usd numeric, latency_ms integer,
                   metadata jsonb, follow_ups jsonb, actions jsonb, time_to_first_token_ms integer)
  ), todo as (
    select r.id, r.message_id, r.thread_id, r.user_id, i.attempt, i.model, coalesce(i.provider, 'replicate') as provider,
           i.prediction_id, i.input_tokens, i.output_tokens, i.cost_usd, i.latency_ms, i.time_to_first_token_ms,
           left(i.body, 8000) as body,
           coalesce(i.metadata, '{}'::jsonb)
             || case when char_length(i.body) > 8000
                     then jsonb_build_object('truncated', true, 'original_length', char_length(i.body))
                     else '{}'::jsonb end as metadata,
           case when jsonb_typeof(i.follow_ups) = 'array' then i.follow_ups else '[]'::jsonb end as follow_ups,
           case when jsonb_typeof(i.actions) = 'array' then i.actions else '[]'::jsonb end as actions
      from input i
      join public.assistant_runs r on r.id = i.run_id
     where r.status in ('queued', 'in_progress') and r.cancel_requested_at is null
  ), inserted as (
    insert into public.assistant_messages
      (thread_id, user_id, role, content, reply_to, model, token_count, latency_ms, metadata_json)
    select t.thread_id, t.user_id, 'assistant', t.body, t.message_id, t.model, t.output_tokens, t.latency_ms, t.metadata
      from todo t
     order by t.thread_id, t.id  -- threads' rows in one order, as claim_runs updates them
    on conflict (reply_to) do nothing
    returning id, reply_to
  ), replies as (
    select t.*, coalesce(n.id, (select m.id from public.assistant_messages m where m.reply_to = t.message_id)) as reply_id
      from todo t
      left join inserted n on n.reply_to = t.message_id
  ), events as (
    insert into public.assistant_inference_events
      (user_id, thread_id, message_id, run_id, attempt, provider, model, prediction_id, status,
       latency_ms, input_tokens, output_tokens, cost_estimate_usd, time_to_first_token_ms)
    select t.user_id, t.thread_id, t.message_id, t.id, t.attempt, t.provider, t.model, t.prediction_id, 'succeeded',
           t.latency_ms, t.input_tokens, t.output_tokens, t.cost_usd, t.time_to_first_token_ms
      from todo t
    on conflict (run_id, attempt) where run_id is not null do nothing
  ), follow_ups as (
    insert into public.assistant_follow_ups (user_id, thread_id, message_id, position, suggestion)
    select t.user_id, t.thread_id, t.reply_id, f.ordinality, left(btrim(f.value), 300)
      from replies t
     cross join lateral jsonb_array_elements_text(t.follow_ups) with ordinality f
     where f.ordinality <= 3 and btrim(f.value) <> ''
    on conflict (message_id, position) do nothing
  ), actions as (
    insert into public.assistant_action_requests (user_id, thread_id, message_id, action_type, payload)
    select t.user_id, t.thread_id, t.reply_id, a.value ->> 'type', coalesce(a.value -> 'payload', '{}'::jsonb)
      from replies t
     cross join lateral jsonb_array_elements(t.actions) a
     where exists (select 1 from public.assistant_action_types k where k.name = a.value ->> 'type')
       and jsonb_typeof(coalesce(a.value -> 'payload', '{}'::jsonb)) = 'object'
  ), done as (
    update public.assistant_runs r
       set status = 'completed', lease_owner = null, lease_expires_at = null, finished_at = now()
      from todo t
     where r.id = t.id
    returning r.id
  )
  select count(*) into completed from done;

  return query  -- each element's reply, if it is its attempt's (see 5)
  select r.id, case when exists (select 1 from public.assistant_inference_events e
                                  where e.run_id = r.id and e.status = 'succeeded'
                                    and e.attempt = (p_runs -> (x.n - 1)::integer ->> 'attempt')::integer)
                    then (select m.id from public.assistant_messages m where m.reply_to = r.message_id) end
    from unnest(ids) with ordinality x (id, n)
    join public.assistant_runs r on r.id = x.id
   order by x.n;
end
$$;

create or replace function public.fail_attempt(
  p_run_id uuid,
  p_attempt integer,
  p_error_code text,
  p_error text default null,
  p_retryable boolean default true,
  p_retry_in_seconds double precision default null,
  p_model text default 'unknown',
  p_provider text default 'replicate',
  p_prediction_id text default null,
  p_latency_ms integer default null,
  p_consumed jsonb default null
) returns text
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
  delay double precision;
  recorded integer;
  consumed jsonb := coalesce(p_consumed, '{}'::jsonb);
begin
  if p_error_code is null or p_error_code !~ '^[a-z_]{1,64}$' then
    raise exception 'p_error_code must be a lower_snake_case code (got %)', p_error_code using errcode = '22023';
  end if;
  if jsonb_typeof(consumed) <> 'object' then
    raise exception 'p_consumed must be an object (input_tokens, output_tokens, cost_usd)' using errcode = '22023';
  end if;
  perform public.assistant_lock_requests(array[p_run_id]);  -- the thread and message before the run
  select * into run from public.assistant_runs where id = p_run_id for update;
  if not found then
    raise exception 'run % not found', p_run_id using errcode = 'P0002';
  end if;

  insert into public.assistant_inference_events
    (user_id, thread_id, message_id, run_id, attempt, provider, model, prediction_id, status, latency_ms,
     input_tokens, output_tokens, cost_estimate_usd, error_code)
  values
    (run.user_id, run.thread_id, run.message_id, run.id, p_attempt, p_provider, coalesce(p_model, 'unknown'),
     p_prediction_id, 'failed', p_latency_ms, (consumed ->> 'input_tokens')::integer,
     (consumed ->> 'output_tokens')::integer, (consumed ->> 'cost_usd')::numeric, p_error_code)
  on conflict (run_id, attempt) where run_id is not null do nothing;
  get diagnostics recorded = row_count;

  if run.status <> 'in_progress' or run.attempts <> p_attempt then
    -- This very call again (its answer was lost on the way): its event is recorded already and
    -- the run is as that call left it, so the same answer.
    if recorded = 0 and run.attempts = p_attempt and run.status in ('queued', 'failed')
       and run.last_error_code is not distinct from p_error_code then
      return run.status;
    end if;
    if recorded = 0 and run.attempts = p_attempt and run.status = 'cancelled' and run.cancel_requested_at is not null
       and exists (select 1 from public.assistant_inference_events e  -- its own failed event, not a
                    where e.run_id = p_run_id and e.attempt = p_attempt and e.status = 'failed') then  -- claim's (see 6)
      return 'cancelled';
    end if;
    -- The run moved on without this attempt: another attempt took it over, completed it or
    -- failed it, its lease ran out on the last attempt, or its user cancelled it.
    return 'superseded';
  end if;

  if run.cancel_requested_at is not null then
    -- Its user cancelled it while this attempt was failing: ended, not tried again.
    perform public.finish_cancelled(p_run_id, null);
    return 'cancelled';
  end if;

  if p_retryable and run.attempts < run.max_attempts then
    delay := case when p_retry_in_seconds is null then least(300, 2 ^ run.attempts)
                  else least(greatest(p_retry_in_seconds, 0), 3600) end;
    update public.assistant_runs
       set status = 'queued', lease_owner = null, lease_expires_at = null,
           next_attempt_at = now() + make_interval(secs => delay),
           last_error_code = p_error_code, last_error = left(p_error, 2000)
     where id = p_run_id;
    return 'queued';
  end if;

  perform public.assistant_finish_failed(p_run_id, p_error_code, p_error);
  return 'failed';
end
$$;

create or replace function public.finish_cancelled(p_run_id uuid, p_consumed jsonb) returns boolean
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
  consumed jsonb := coalesce(p_consumed, '{}'::jsonb);
  recorded integer;
begin
  perform public.assistant_lock_requests(array[p_run_id]);  -- the thread and message before the run
  select * into run from public.assistant_runs where id = p_run_id for update;
  if not found then
    return false;  -- deleted with its message: record_orphaned_consumption
  end if;
  insert into public.assistant_inference_events
    (user_id, thread_id, message_id, run_id, attempt, provider, model, prediction_id, status, latency_ms,
     input_tokens, output_tokens, cost_estimate_usd, error_code)
  values
    (run.user_id, run.thread_id, run.message_id, run.id, coalesce((consumed ->> 'attempt')::integer,
              case when run.status = 'queued' then run.attempts + 1 else greatest(run.attempts, 1) end),
     coalesce(consumed ->> 'provider', 'replicate'), coalesce(consumed ->> 'model', 'not_started'),
     consumed ->> 'prediction_id', 'cancelled', (consumed ->> 'latency_ms')::integer,
     (consumed ->> 'input_tokens')::integer, (consumed ->> 'output_tokens')::integer,
     (consumed ->> 'cost_usd')::numeric, 'cancelled')
  on conflict (run_id, attempt) where run_id is not null do nothing;
  get diagnostics recorded = row_count;
  if recorded = 0 and coalesce(consumed ->> 'prediction_id', '') <> '' then
    -- The attempt's cancelled event is there without a prediction: a claim ended the run when
    -- the lease of this attempt ran out (see 4, 6). The prediction goes on it, and what it
    -- consumed on the user's usage, once (as a late create's: record_cancelled_consumption).
    perform public.record_cancelled_consumption(p_run_id, consumed || jsonb_build_object('attempt',
      coalesce((consumed ->> 'attempt')::integer,
               case when run.status = 'queued' then run.attempts + 1 else greatest(run.attempts, 1) end)));
  end if;
  if recorded > 0 and (coalesce((consumed ->> 'input_tokens')::integer, 0) + coalesce((consumed ->> 'output_tokens')::integer, 0) > 0
     or coalesce((consumed ->> 'cost_usd')::numeric, 0) > 0) then
    perform public.ai_usage_add(run.user_id, jsonb_build_object(
      'tokens', coalesce((consumed ->> 'input_tokens')::integer, 0) + coalesce((consumed ->> 'output_tokens')::integer, 0),
      'cost_usd', coalesce((consumed ->> 'cost_usd')::numeric, 0)));
  end if;
  update public.assistant_runs
     set status = 'cancelled', lease_owner = null, lease_expires_at = null, finished_at = now(),
         last_error_code = 'cancelled', last_error = 'cancelled by the user'
   where id = p_run_id and status in ('queued', 'in_progress');  -- an ended run stays as it ended
  return true;
end
$$;

create or replace function public.cancel_run(p_run_id uuid) returns text
language plpgsql
security definer
set search_path = ''
as $$
declare
  run public.assistant_runs;
begin
  -- The thread and message before the run, and only for the user's own request.
  if exists (select 1 from public.assistant_runs r where r.id = p_run_id and r.user_id = auth.uid()) then
    perform public.assistant_lock_requests(array[p_run_id]);
  end if;
  select * into run from public.assistant_runs where id = p_run_id for update;
  if not found or run.user_id is distinct from auth.uid() then
    raise exception 'request % not found', p_run_id using errcode = 'P0002',
      hint = 'you can cancel only your own requests';
  end if;
  if run.status not in ('queued', 'in_progress') then
    raise exception 'this request already ended (%)', run.status using errcode = '22023';
  end if;
  if run.status = 'queued' then
    perform public.finish_cancelled(p_run_id, null);
    return 'cancelled';
  end if;
  update public.assistant_runs set cancel_requested_at = coalesce(cancel_requested_at, now()) where id = p_run_id;
  perform pg_notify('assistant_cancel', p_run_id::text);
  return 'cancelling';
end
$$;

create or replace function public.release_run(p_run_id uuid, p_worker text, p_attempt integer) returns boolean
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
begin
  perform public.assistant_lock_requests(array[p_run_id]);  -- the thread and message before the run
  select * into run from public.assistant_runs
   where id = p_run_id and status = 'in_progress' and lease_owner = p_worker and attempts = p_attempt
     for update;
  if not found then
    return false;
  end if;
  if run.cancel_requested_at is not null then
    perform public.finish_cancelled(p_run_id, null);  -- its user cancelled it meanwhile: not queued again
    return true;
  end if;
  update public.assistant_runs
     set status = 'queued', attempts = attempts - 1, lease_owner = null, lease_expires_at = null,
         next_attempt_at = now()
   where id = p_run_id;
  return true;
end
$$;

create or replace function public.record_abandoned_attempt(p_run_id uuid, p_consumed jsonb) returns boolean
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
  attempt_no integer;
  recorded integer;
begin
  if p_run_id is null or p_consumed is null or jsonb_typeof(p_consumed) <> 'object'
     or jsonb_typeof(p_consumed -> 'attempt') is distinct from 'number' then
    raise exception 'p_run_id and p_consumed (an object with the attempt''s number) are required'
      using errcode = '22023', hint = 'pass what the abandoned attempt''s prediction consumed, as finish_cancelled takes it';
  end if;
  attempt_no := (p_consumed ->> 'attempt')::integer;
  if attempt_no < 1 then
    raise exception 'attempt numbers start at 1 (got %)', attempt_no using errcode = '22023';
  end if;
  -- Locked against a delete meanwhile (the event's foreign keys: the thread and message first),
  -- not against the other attempt.
  perform public.assistant_lock_requests(array[p_run_id]);
  select * into run from public.assistant_runs where id = p_run_id for key share;
  if not found then
    return false;  -- deleted with its message or thread
  end if;
  if attempt_no > run.attempts or (attempt_no = run.attempts and run.status in ('queued', 'in_progress')) then
    -- The number is (or will be again) another attempt's: a release at shutdown gives it back.
    return false;
  end if;
  insert into public.assistant_inference_events
    (user_id, thread_id, message_id, run_id, attempt, provider, model, prediction_id, status, latency_ms,
     input_tokens, output_tokens, cost_estimate_usd, error_code)
  values
    (run.user_id, run.thread_id, run.message_id, run.id, attempt_no, coalesce(p_consumed ->> 'provider', 'replicate'),
     coalesce(p_consumed ->> 'model', 'not_started'), p_consumed ->> 'prediction_id', 'failed',
     (p_consumed ->> 'latency_ms')::integer, (p_consumed ->> 'input_tokens')::integer,
     (p_consumed ->> 'output_tokens')::integer, (p_consumed ->> 'cost_usd')::numeric, 'lease_lost')
  on conflict (run_id, attempt) where run_id is not null do nothing;
  get diagnostics recorded = row_count;
  if recorded = 0 and coalesce(p_consumed ->> 'prediction_id', '') <> '' then
    -- Its run was ended cancelled under this attempt's number (by a claim, its user having asked
    -- while the lease ran out: see 4): what the prediction consumed goes on that event and the
    -- user's usage, as a cancelled request's (once: record_cancelled_consumption).
    return public.record_cancelled_consumption(p_run_id, p_consumed);
  end if;
  return recorded > 0;
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
  select coalesce(array_agg(s.id), '{}') into end_ids
    from (select r.id from public.assistant_runs r
            join public.assistant_threads t on t.id = r.thread_id
            join public.assistant_messages m on m.id = r.message_id
           where r.status = 'in_progress' and r.lease_expires_at <= now()
             and (r.attempts >= r.max_attempts or r.cancel_requested_at is not null)
           order by r.lease_expires_at
           limit p_limit
           for update of r skip locked
           for key share of t, m skip locked) s;  -- the thread and message too: see 2
  end_kinds := array_fill('stale'::text, array[cardinality(end_ids)]);
  if cardinality(end_ids) > 0 then  -- ended below: already holding nothing for the admissions (20261123001700, 1)
    update public.assistant_runs set reserved_tokens = 0, reserved_usd = 0
     where id = any(end_ids) and (reserved_tokens > 0 or reserved_usd > 0);
  end if;
  end_verdicts := array_fill(null::jsonb, array[cardinality(end_ids)]);
  end_vision := array_fill(false, array[cardinality(end_ids)]);

  for claimed in
    -- Two index scans (queued by due time, in progress by lease expiry), each locking only what
    -- it returns; SKIP LOCKED lets concurrent workers take disjoint runs.
    with due_queued as (
      select r.id, r.admitted_at from public.assistant_runs r
        join public.assistant_threads t on t.id = r.thread_id
        join public.assistant_messages m on m.id = r.message_id
       where r.status = 'queued' and r.next_attempt_at <= now()
       order by r.next_attempt_at
       limit p_limit
       for update of r skip locked
       for key share of t, m skip locked  -- see 2
    ), due_expired as (
      select r.id, r.admitted_at from public.assistant_runs r
        join public.assistant_threads t on t.id = r.thread_id
        join public.assistant_messages m on m.id = r.message_id
       where r.status = 'in_progress' and r.lease_expires_at <= now() and r.attempts < r.max_attempts
         and r.cancel_requested_at is null  -- ended above, never a new attempt (20261123001600, 3)
       order by r.lease_expires_at
       limit p_limit
       for update of r skip locked
       for key share of t, m skip locked  -- see 2
    ), due as (
      select id, admitted_at from due_expired
      union all
      select id, admitted_at from due_queued
      limit p_limit
    ), taken as (
      update public.assistant_runs r
         set status = 'in_progress', attempts = r.attempts + 1, lease_owner = p_worker,
             lease_expires_at = now() + make_interval(secs => p_lease_seconds),
             admitted_at = coalesce(r.admitted_at, now()),
             last_error_code = nullif(r.last_error_code, 'replies_in_flight')
        from due where r.id = due.id
      returning r.id, r.user_id, r.created_at, r.attempts, due.admitted_at is null as to_admit,
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

create or replace function public.assistants_after_withdrawal() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  run public.assistant_runs;
  ids uuid[];
begin
  -- Their threads and messages, then all the runs, before the first reply (see 6): the lock
  -- order of every writer, and replies in thread order, as the claim and completions write them.
  -- A run queued after this look is ended by the claim that takes it (20261123001400).
  ids := array(
    select r.id from public.assistant_runs r
      join public.assistant_threads t on t.id = r.thread_id
      join auth.users u on u.id = r.user_id
     where t.assistant_id = new.id and r.status = 'queued'
       and (not new.is_active or (new.offered_to = 'members' and coalesce(u.is_anonymous, false))));
  perform public.assistant_lock_requests(ids);
  perform 1 from public.assistant_runs r where r.id = any(ids) order by r.thread_id, r.id for update;
  for run in
    select r.* from public.assistant_runs r
     where r.id = any(ids) and r.status = 'queued'  -- still queued, now that it is locked
     order by r.thread_id, r.id
  loop
    insert into public.assistant_inference_events
      (user_id, thread_id, message_id, run_id, attempt, provider, model, status, error_code)
    values (run.user_id, run.thread_id, run.message_id, run.id, run.attempts + 1, 'replicate', 'not_started',
            'failed', 'assistant_unavailable')
    on conflict (run_id, attempt) where run_id is not null do nothing;
    perform public.assistant_finish_failed(run.id, 'assistant_unavailable',
      format('assistant %s was withdrawn while the request was queued', new.slug));
  end loop;
  return null;
end
$$;

-- `create or replace` resets the function's settings: as in 20261123000500.
alter function public.complete_runs(jsonb) set plan_cache_mode = force_generic_plan;
alter function public.complete_run(uuid, integer, text, text, text, text, integer, integer, numeric, integer, jsonb,
                                   jsonb, jsonb, integer)
  set plan_cache_mode = force_generic_plan;
