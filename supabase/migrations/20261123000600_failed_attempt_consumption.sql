-- A failed attempt records what its prediction consumed.
--
-- Replicate bills a prediction that failed, was cancelled at the attempt's deadline or answered
-- with an output the worker could not use (malformed, empty) for what it ran: the seconds it was
-- active on a per-second model, its tokens on a per-token one. fail_attempt recorded such an
-- attempt's event without tokens or cost, so the operator reports (ai_usage_daily, _monthly,
-- _today: sums of the events) and the worker's cost metric left that spend out.
--
-- fail_attempt takes p_consumed (as finish_cancelled takes it: input_tokens, output_tokens,
-- cost_usd) and writes it on the attempt's failed event. It is not added to the user's usage
-- (ai_usage_windows): the quotas count what users were given, and a provider's failure is the
-- operator's cost, not the user's. The event is still recorded once per run and attempt.
--
-- A cancellation that comes while an attempt fails ends the run cancelled: cancel_run on a run
-- in progress only flags it, and a retryable failure reported before the worker acted on the
-- flag queued the run again, flag and all, to be claimed and paid for anew. fail_attempt records
-- the failed attempt as before, then ends a flagged run cancelled (finish_cancelled) and answers
-- 'cancelled' (20261123000900 does the same for release_run).

drop function public.fail_attempt(uuid, integer, text, text, boolean, double precision, text, text, text, integer);

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
    if recorded = 0 and run.attempts = p_attempt and run.status = 'cancelled' and run.cancel_requested_at is not null then
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

comment on function public.fail_attempt(uuid, integer, text, text, boolean, double precision, text, text, text, integer,
                                        jsonb) is
  'Worker: records a failed attempt (its event, with what its prediction consumed: p_consumed input_tokens, '
  'output_tokens, cost_usd, not counted as the user''s usage) and queues a retry or fails the run. '
  'Answers queued, failed or superseded.';

revoke execute on function
  public.fail_attempt(uuid, integer, text, text, boolean, double precision, text, text, text, integer, jsonb)
  from public, anon, authenticated;
grant execute on function
  public.fail_attempt(uuid, integer, text, text, boolean, double precision, text, text, text, integer, jsonb)
  to service_role;
