-- Rolls back 20261123000900_cancellations_not_requeued.sql: fail_attempt is again the body of
-- 20261123000600 and release_run that of 20261122000400 (a flagged run goes back to the queue).
begin;
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
    -- The run moved on without this attempt: another attempt took it over, completed it or
    -- failed it, its lease ran out on the last attempt, or its user cancelled it.
    return 'superseded';
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

create or replace function public.release_run(p_run_id uuid, p_worker text, p_attempt integer) returns boolean
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
delete from supabase_migrations.schema_migrations where version = '20261123000900';
commit;
