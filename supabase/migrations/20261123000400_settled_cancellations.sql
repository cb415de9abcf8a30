-- A run cancelled while its prediction's create was still on its way to Replicate (held by
-- `Prefer: wait`, or not yet answered) ends at once, with a cancelled event that names the model
-- but no prediction: the worker does not know its id yet. When the create answers, the worker
-- cancels the prediction at Replicate and records here what it consumed, so a request cancelled
-- mid-create is charged like any other cancelled request (no free tokens by cancelling early).
--
-- Fills the cancelled event of that attempt once: a second call for the same attempt, or a call
-- for an attempt whose event already names a prediction, changes nothing and answers false.
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
