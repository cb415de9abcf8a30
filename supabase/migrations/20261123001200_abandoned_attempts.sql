-- An attempt that its worker abandoned, because its lease was no longer its own, is recorded.
--
-- A worker that notices it lost a run's lease (a stalled event loop, a database outage longer
-- than the lease) stops that attempt and cancels its prediction at Replicate; another attempt
-- holds the lease and answers. The abandoned attempt recorded nothing: Replicate had been paid
-- for its prediction up to the cancellation, and neither the operator reports nor the cost
-- metric saw it, and the run's attempts were no longer each accounted for by one event.
--
-- record_abandoned_attempt(p_run_id, p_consumed) records it: a `failed` inference event for the
-- attempt, error code `lease_lost`, with what its prediction consumed (p_consumed as
-- finish_cancelled takes it: attempt, model, prediction_id, input_tokens, output_tokens,
-- cost_usd). Like every failed attempt it is not charged to the user: quotas count what users
-- were given. Once per attempt: true when recorded; false when the attempt already has an
-- event, the run no longer exists, or the attempt's number is the run's current one while the
-- run is open (or beyond it: a release gave it back), where it belongs to the attempt that
-- holds, or will hold, the lease. It takes no lease: the lease is the point. Service role only.

create function public.record_abandoned_attempt(p_run_id uuid, p_consumed jsonb) returns boolean
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
  -- Locked against a delete meanwhile (the event's foreign key), not against the other attempt.
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
  return recorded > 0;
end
$$;

comment on function public.record_abandoned_attempt(uuid, jsonb) is
  'Worker: an attempt abandoned because its lease was lost, on a failed event (error_code lease_lost) with what its '
  'prediction consumed, not charged to the user; once per attempt (false if it has an event or the run is gone).';

revoke execute on function public.record_abandoned_attempt(uuid, jsonb) from public, anon, authenticated;
grant execute on function public.record_abandoned_attempt(uuid, jsonb) to service_role;
