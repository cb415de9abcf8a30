-- Rolls back 20261123002000_complete_runs_answers_from_its_writes.sql: complete_runs as
-- 20261123001900 left it.
begin;

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

alter function public.complete_runs(jsonb) set plan_cache_mode = force_generic_plan;

delete from supabase_migrations.schema_migrations where version = '20261123002000';
commit;
