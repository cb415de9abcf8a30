-- Rolls back 20261123000600_failed_attempt_consumption.sql: fail_attempt is again the body of
-- 20261123000300, without p_consumed (failed events carry no tokens or cost).
begin;
drop function public.fail_attempt(uuid, integer, text, text, boolean, double precision, text, text, text, integer, jsonb);
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
  recorded integer;
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
revoke execute on function
  public.fail_attempt(uuid, integer, text, text, boolean, double precision, text, text, text, integer)
  from public, anon, authenticated;
grant execute on function
  public.fail_attempt(uuid, integer, text, text, boolean, double precision, text, text, text, integer)
  to service_role;
delete from supabase_migrations.schema_migrations where version = '20261123000600';
commit;
