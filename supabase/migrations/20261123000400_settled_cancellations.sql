-- Cancellations, counted once.
--
-- 1. finish_cancelled counts what was consumed only with the event it records (one per run and
--    attempt), and ends only an open run. Before, a second call for the same attempt (a worker
--    cancelled while its completion was on its way: complete_runs had ended the run cancelled and
--    counted already) counted the tokens and cost again, and a call for a run that had completed
--    turned it cancelled. Another attempt's call (a worker whose lease had run out, its run taken
--    over and ended meanwhile) still records and counts what its own prediction consumed.
--
-- 2. A run cancelled while its prediction's create was still on its way to Replicate (held by
--    `Prefer: wait`, or not yet answered) ends at once, with a cancelled event that names the model
--    but no prediction: the worker does not know its id yet. When the create answers, the worker
--    cancels the prediction at Replicate and records here what it consumed, so a request cancelled
--    mid-create is charged like any other cancelled request (no free tokens by cancelling early).
--
--    Fills the cancelled event of that attempt once: a second call for the same attempt, or a call
--    for an attempt whose event already names a prediction, changes nothing and answers false.

create or replace function public.finish_cancelled(p_run_id uuid, p_consumed jsonb) returns void
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
  consumed jsonb := coalesce(p_consumed, '{}'::jsonb);
  recorded integer;
begin
  select * into run from public.assistant_runs where id = p_run_id for update;
  if not found then
    return;
  end if;
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
  get diagnostics recorded = row_count;
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
end
$$;

create function public.record_cancelled_consumption(p_run_id uuid, p_consumed jsonb) returns boolean
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

-- Only the worker (service role) calls it.
revoke execute on function public.record_cancelled_consumption(uuid, jsonb) from public, anon, authenticated;
grant execute on function public.record_cancelled_consumption(uuid, jsonb) to service_role;
