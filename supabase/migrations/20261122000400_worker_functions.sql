-- The worker's API: every state change of a run is one of these functions, called by the service
-- role (PostgREST RPC on the supabase transport, a direct call on the postgres transport).
-- Each is one transaction and safe to repeat.

-- The text a user sees when no reply could be produced.
create function public.assistant_failure_text(p_error_code text) returns text
language sql immutable
set search_path = ''
as $$
  select 'Sorry, I could not produce a reply this time: ' || case p_error_code
    when 'rate_limited' then 'the model service is busy.'
    when 'provider_unavailable' then 'the model service is unavailable.'
    when 'timeout' then 'the model took too long to answer.'
    when 'model_failed' then 'the model failed on this request.'
    when 'invalid_output' then 'the model returned an unusable answer.'
    when 'unauthorized' then 'the assistant is not configured correctly.'
    when 'billing_required' then 'the assistant''s model account needs attention.'
    when 'invalid_input' then 'the request could not be sent to the model.'
    when 'lease_expired' then 'the assistant stopped while working on it.'
    when 'model_not_found' then 'the assistant''s model is not available.'
    when 'byok_token_invalid' then 'Replicate refused your API token; update it in your settings.'
    when 'byok_billing_required' then 'your Replicate account needs billing attention.'
    when 'byok_token_missing' then 'your plan uses your own Replicate API token, and none is set.'
    when 'byok_token_unreadable' then 'your stored Replicate token cannot be read; set it again in your settings.'
    else 'an unexpected error occurred.'
  end || ' Please try again.'
$$;

-- Ends a run as failed with a reply that says so (error_code in its metadata). Caller holds the
-- run's row lock.
create function public.assistant_finish_failed(p_run_id uuid, p_error_code text, p_error text)
returns void
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
begin
  select * into run from public.assistant_runs where id = p_run_id;
  insert into public.assistant_messages (thread_id, user_id, role, content, reply_to, metadata_json)
  values (run.thread_id, run.user_id, 'assistant',
          case when p_error_code = 'invalid_image'  -- the reason is the user's to fix: say it
               then left('Sorry, I could not use the attached image: ' || coalesce(p_error, 'it was refused') || '.', 8000)
               else public.assistant_failure_text(p_error_code) end,
          run.message_id,
          jsonb_build_object('error_code', p_error_code, 'failed', true))
  on conflict (reply_to) do nothing;
  update public.assistant_runs
     set status = 'failed', lease_owner = null, lease_expires_at = null, finished_at = now(),
         last_error_code = p_error_code, last_error = left(p_error, 2000)
   where id = p_run_id;
end
$$;

-- Ends a run refused at admission: a blocked inference event with the verdict, and a reply that
-- says which limit was hit and when it resets. Nothing is sent to the model.
create function public.assistant_finish_blocked(p_run_id uuid, p_verdict jsonb, p_model text)
returns void
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
  code text := case p_verdict ->> 'reason' when 'limit_reached' then 'quota_exceeded' else p_verdict ->> 'reason' end;
begin
  select * into run from public.assistant_runs where id = p_run_id;
  insert into public.assistant_messages (thread_id, user_id, role, content, reply_to, metadata_json)
  values (run.thread_id, run.user_id, 'assistant', public.ai_refusal_text(p_verdict), run.message_id,
          jsonb_build_object('error_code', code, 'blocked', true, 'limit', p_verdict))
  on conflict (reply_to) do nothing;
  insert into public.assistant_inference_events
    (user_id, thread_id, message_id, run_id, attempt, provider, model, status, error_code, safety_flags_json)
  values (run.user_id, run.thread_id, run.message_id, run.id, greatest(run.attempts, 1), 'replicate',
          coalesce(p_model, 'unrouted'), 'blocked', code, jsonb_build_object('admission', p_verdict))
  on conflict (run_id, attempt) where run_id is not null do nothing;
  update public.assistant_runs
     set status = 'blocked', lease_owner = null, lease_expires_at = null, finished_at = now(),
         last_error_code = code, last_error = public.ai_refusal_text(p_verdict)
   where id = p_run_id;
end
$$;

-- Ends a run as cancelled by its user: no reply; an inference event with status cancelled and,
-- when a prediction had started (p_consumed: attempt, model, prediction_id, tokens, cost,
-- latency), what it consumed, which is also counted against the user's limits.
create function public.finish_cancelled(p_run_id uuid, p_consumed jsonb) returns void
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
  consumed jsonb := coalesce(p_consumed, '{}'::jsonb);
begin
  select * into run from public.assistant_runs where id = p_run_id;
  insert into public.assistant_inference_events
    (user_id, thread_id, message_id, run_id, attempt, provider, model, prediction_id, status, latency_ms,
     input_tokens, output_tokens, cost_estimate_usd, error_code)
  values
    (run.user_id, run.thread_id, run.message_id, run.id, coalesce((consumed ->> 'attempt')::integer, greatest(run.attempts, 1)),
     coalesce(consumed ->> 'provider', 'replicate'), coalesce(consumed ->> 'model', 'not_started'),
     consumed ->> 'prediction_id', 'cancelled', (consumed ->> 'latency_ms')::integer,
     (consumed ->> 'input_tokens')::integer, (consumed ->> 'output_tokens')::integer,
     (consumed ->> 'cost_usd')::numeric, 'cancelled')
  on conflict (run_id, attempt) where run_id is not null do nothing;
  if coalesce((consumed ->> 'input_tokens')::integer, 0) + coalesce((consumed ->> 'output_tokens')::integer, 0) > 0
     or coalesce((consumed ->> 'cost_usd')::numeric, 0) > 0 then
    perform public.ai_usage_add(run.user_id, jsonb_build_object(
      'tokens', coalesce((consumed ->> 'input_tokens')::integer, 0) + coalesce((consumed ->> 'output_tokens')::integer, 0),
      'cost_usd', coalesce((consumed ->> 'cost_usd')::numeric, 0)));
  end if;
  update public.assistant_runs
     set status = 'cancelled', lease_owner = null, lease_expires_at = null, finished_at = now(),
         last_error_code = 'cancelled', last_error = 'cancelled by the user'
   where id = p_run_id;
end
$$;

-- What a user calls to stop their own request. A queued run ends cancelled at once (it was never
-- admitted, so nothing is counted); a running one is flagged, and its worker stops waiting,
-- cancels the prediction at Replicate and ends it (NOTIFY assistant_cancel wakes it at once on
-- the postgres transport; workers also look for flagged runs every second).
create function public.cancel_run(p_run_id uuid) returns text
language plpgsql
security definer
set search_path = ''
as $$
declare
  run public.assistant_runs;
begin
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

-- For the worker: which of these runs (its runs in flight) their users asked to cancel.
create function public.cancelled_runs(p_run_ids jsonb) returns table (run_id uuid)
language sql stable
set search_path = ''
as $$
  select r.id from public.assistant_runs r
   where r.id in (select value::uuid from jsonb_array_elements_text(p_run_ids))
     and r.cancel_requested_at is not null and r.status = 'in_progress'
$$;

-------------------------------------------------------------------------------------------------
-- claim_runs: take up to p_limit due runs for p_worker, with a lease of p_lease_seconds.
-- A run is due when queued and its next attempt time has come, or in progress with an expired
-- lease (its worker died). SKIP LOCKED lets any number of workers claim side by side. Each claim
-- counts an attempt; a run whose lease expired on its last attempt is failed instead.
-- A run is admitted against its user's plan once, at its first claim (admit_request); a refused
-- run ends as blocked here and is returned only with its blocked_code set (p_chat_model /
-- p_vision_model name the model it would have gone to, for its event).
-- Returns what the worker needs to build the model input, in the same round trip: the message,
-- up to 50 earlier messages of its thread (oldest first, failure and refusal notices left out),
-- the user's plan, the thread's assistant (the default one if it has none) and the user's AI
-- profile.
-------------------------------------------------------------------------------------------------
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
      select r.id from public.assistant_runs r
       where r.status = 'queued' and r.next_attempt_at <= now()
       order by r.next_attempt_at
       limit p_limit
       for update skip locked
    ), due_expired as (
      select r.id from public.assistant_runs r
       where r.status = 'in_progress' and r.lease_expires_at <= now() and r.attempts < r.max_attempts
       order by r.lease_expires_at
       limit p_limit
       for update skip locked
    ), due as (
      select id from due_expired
      union all
      select id from due_queued
      limit p_limit
    )
    update public.assistant_runs r
       set status = 'in_progress', attempts = r.attempts + 1, lease_owner = p_worker,
           lease_expires_at = now() + make_interval(secs => p_lease_seconds)
      from due where r.id = due.id
    returning r.id, r.user_id, r.admitted_at,
              (select m.image_url is not null from public.assistant_messages m where m.id = r.message_id) as vision
  loop
    if claimed.admitted_at is null then
      verdict := public.admit_request(claimed.user_id, claimed.vision);
      if not (verdict ->> 'admitted')::boolean then
        perform public.assistant_finish_blocked(claimed.id, verdict,
          case when claimed.vision then p_vision_model else p_chat_model end);
        blocked := blocked || claimed.id;
        continue;
      end if;
      update public.assistant_runs set admitted_at = now() where id = claimed.id;
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

-------------------------------------------------------------------------------------------------
-- complete_run: the reply, its inference event and the run's completion, in one transaction.
-- Repeating it (a retry after a crash or a lost response) changes nothing and returns the same
-- reply id; a run that already ended (another attempt won, or it was cancelled) is left alone.
-- Content over 8000 characters is cut, with metadata.truncated = true. With the reply come up to
-- three follow-up suggestions (p_follow_ups: an array of strings) and the actions the model
-- proposed (p_actions: [{"type": …, "payload": {…}}], registered types only), stored pending.
-------------------------------------------------------------------------------------------------
create function public.complete_run(
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
  select * into run from public.assistant_runs where id = p_run_id for update;
  if not found then
    raise exception 'run % not found', p_run_id using errcode = 'P0002';
  end if;
  if run.status not in ('queued', 'in_progress') then
    select id into reply_id from public.assistant_messages where reply_to = run.message_id;
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

  -- Tokens and cost count against the user's limits once: this branch runs once per run.
  perform public.ai_usage_add(run.user_id, jsonb_build_object(
    'tokens', coalesce(p_input_tokens, 0) + coalesce(p_output_tokens, 0), 'cost_usd', coalesce(p_cost_usd, 0)));

  update public.assistant_runs
     set status = 'completed', lease_owner = null, lease_expires_at = null, finished_at = now()
   where id = p_run_id;
  return reply_id;
end
$$;

-------------------------------------------------------------------------------------------------
-- fail_attempt: records a failed attempt (an inference event with status failed) and either
-- schedules the next attempt (retryable errors, attempts left; after p_retry_in_seconds, or an
-- exponential backoff of 2, 4, 8 … seconds up to 5 minutes) or ends the run as failed with a reply
-- that says so. Returns the run's status afterwards. Safe to repeat; an attempt that is no longer
-- the run's current one (it was re-claimed) only leaves its event.
-------------------------------------------------------------------------------------------------
create function public.fail_attempt(
  p_run_id uuid,
  p_attempt integer,
  p_error_code text,
  p_error text default null,
  p_retryable boolean default true,
  p_retry_in_seconds double precision default null,
  p_model text default 'unknown',
  p_provider text default 'replicate',
  p_prediction_id text default null,
  p_latency_ms integer default null
) returns text
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
  delay double precision;
begin
  if p_error_code is null or p_error_code !~ '^[a-z_]{1,64}$' then
    raise exception 'p_error_code must be a lower_snake_case code (got %)', p_error_code using errcode = '22023';
  end if;
  select * into run from public.assistant_runs where id = p_run_id for update;
  if not found then
    raise exception 'run % not found', p_run_id using errcode = 'P0002';
  end if;

  insert into public.assistant_inference_events
    (user_id, thread_id, message_id, run_id, attempt, provider, model, prediction_id, status, latency_ms, error_code)
  values
    (run.user_id, run.thread_id, run.message_id, run.id, p_attempt, p_provider, coalesce(p_model, 'unknown'),
     p_prediction_id, 'failed', p_latency_ms, p_error_code)
  on conflict (run_id, attempt) where run_id is not null do nothing;

  if run.status <> 'in_progress' or run.attempts <> p_attempt then
    return run.status;
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

-- release_run: gives a claimed run back untouched (graceful shutdown): queued, due now, and the
-- attempt it was claimed with does not count.
create function public.release_run(p_run_id uuid, p_worker text, p_attempt integer) returns boolean
language sql
set search_path = ''
as $$
  with released as (
    update public.assistant_runs
       set status = 'queued', attempts = attempts - 1, lease_owner = null, lease_expires_at = null,
           next_attempt_at = now()
     where id = p_run_id and status = 'in_progress' and lease_owner = p_worker and attempts = p_attempt
    returning true
  )
  select exists (select 1 from released)
$$;

-- extend_lease: keeps a long prediction's run claimed. False when the lease is no longer ours.
create function public.extend_lease(p_run_id uuid, p_worker text, p_attempt integer, p_lease_seconds integer default 120)
returns boolean
language sql
set search_path = ''
as $$
  with extended as (
    update public.assistant_runs
       set lease_expires_at = now() + make_interval(secs => least(greatest(p_lease_seconds, 5), 3600))
     where id = p_run_id and status = 'in_progress' and lease_owner = p_worker and attempts = p_attempt
    returning true
  )
  select exists (select 1 from extended)
$$;

-- run_queue_status: how many runs are due now and when the next one falls due, so that an idle
-- worker sleeps exactly until then.
create function public.run_queue_status()
returns table (due_now bigint, next_due_at timestamptz, in_progress bigint)
language sql stable
set search_path = ''
as $$
  select
    (select count(*) from public.assistant_runs r
      where (r.status = 'queued' and r.next_attempt_at <= now())
         or (r.status = 'in_progress' and r.lease_expires_at <= now())),
    (select min(t) from (
       select min(r.next_attempt_at) as t from public.assistant_runs r where r.status = 'queued'
       union all
       select min(r.lease_expires_at) from public.assistant_runs r where r.status = 'in_progress') x),
    (select count(*) from public.assistant_runs r where r.status = 'in_progress')
$$;

-- Only the worker (service role) calls these; PostgREST exposes nothing else of them.
revoke execute on function
  public.finish_cancelled(uuid, jsonb),
  public.cancelled_runs(jsonb),
  public.assistant_finish_failed(uuid, text, text),
  public.assistant_finish_blocked(uuid, jsonb, text),
  public.claim_runs(text, integer, integer, text, text),
  public.complete_run(uuid, integer, text, text, text, text, integer, integer, numeric, integer, jsonb, jsonb, jsonb,
                      integer),
  public.fail_attempt(uuid, integer, text, text, boolean, double precision, text, text, text, integer),
  public.release_run(uuid, text, integer),
  public.extend_lease(uuid, text, integer, integer),
  public.run_queue_status()
  from public, anon, authenticated;
revoke execute on function public.cancel_run(uuid) from public, anon;
grant execute on function public.cancel_run(uuid) to authenticated, service_role;
grant execute on function
  public.finish_cancelled(uuid, jsonb),
  public.cancelled_runs(jsonb),
  public.assistant_finish_failed(uuid, text, text),
  public.assistant_finish_blocked(uuid, jsonb, text),
  public.claim_runs(text, integer, integer, text, text),
  public.complete_run(uuid, integer, text, text, text, text, integer, integer, numeric, integer, jsonb, jsonb, jsonb,
                      integer),
  public.fail_attempt(uuid, integer, text, text, boolean, double precision, text, text, text, integer),
  public.release_run(uuid, text, integer),
  public.extend_lease(uuid, text, integer, integer),
  public.run_queue_status()
  to service_role;
