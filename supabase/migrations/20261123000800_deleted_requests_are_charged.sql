-- A request whose message (or thread) its user deletes while the model answers is charged for
-- what its prediction consumed, as a cancelled request is.
--
-- Deleting a message deletes its run (on delete cascade). The worker went on with the
-- prediction, streamed the reply to the thread's clients, and then found the run gone when it
-- wrote the reply (P0002): it dropped the reply and recorded nothing. The user had the reply
-- streamed, the operator paid Replicate, and neither the user's token and cost limits nor the
-- operator reports saw it: deleting the message was a free way to cancel.
--
-- 1. cancelled_runs also answers the ids of runs that no longer exist, and deleting a run in
--    progress sends NOTIFY assistant_cancel: the worker stops the prediction (cancels it at
--    Replicate) as it does for a cancellation.
-- 2. finish_cancelled answers whether the run still exists (it returned nothing).
-- 3. record_orphaned_consumption(p_run_id, p_user_id, p_consumed) records what the prediction of
--    a run that no longer exists consumed: an inference event `cancelled` with error code
--    `request_deleted` (no run, no message; the thread if it still exists) and the user's usage.
--    Once per prediction: a second call, or a call for a prediction whose reply was written
--    before the run was deleted (its event names the prediction), records nothing and answers
--    false; so does a call for a run that still exists, or a user who no longer exists.

create or replace function public.cancelled_runs(p_run_ids jsonb) returns table (run_id uuid)
language sql stable
set search_path = ''
as $$
  select q.id
    from (select distinct value::uuid as id from jsonb_array_elements_text(p_run_ids)) q
    left join public.assistant_runs r on r.id = q.id
   where r.id is null or (r.cancel_requested_at is not null and r.status = 'in_progress')
$$;

create function public.assistant_runs_after_delete() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform pg_notify('assistant_cancel', old.id::text);
  return null;
end
$$;

revoke execute on function public.assistant_runs_after_delete() from public, anon, authenticated;

create trigger assistant_runs_deleted_in_progress
  after delete on public.assistant_runs
  for each row when (old.status = 'in_progress')
  execute function public.assistant_runs_after_delete();

drop function public.finish_cancelled(uuid, jsonb);

create function public.finish_cancelled(p_run_id uuid, p_consumed jsonb) returns boolean
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
    return false;  -- deleted with its message: record_orphaned_consumption
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
  return true;
end
$$;

-- The events of deleted runs (run_id set null by the cascade), by prediction: what
-- record_orphaned_consumption looks for. Events of runs that exist are not in it.
create index idx_assistant_events_orphaned_prediction
  on public.assistant_inference_events (prediction_id) where run_id is null;

create function public.record_orphaned_consumption(p_run_id uuid, p_user_id uuid, p_consumed jsonb) returns boolean
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

comment on function public.record_orphaned_consumption(uuid, uuid, jsonb) is
  'Worker: what the prediction of a run deleted meanwhile (with its message or thread) consumed, on a cancelled '
  'event (error_code request_deleted) and the user''s usage, once per prediction; false if recorded already, '
  'the run still exists or the user does not.';

revoke execute on function
  public.finish_cancelled(uuid, jsonb),
  public.record_orphaned_consumption(uuid, uuid, jsonb)
  from public, anon, authenticated;
grant execute on function
  public.finish_cancelled(uuid, jsonb),
  public.record_orphaned_consumption(uuid, uuid, jsonb)
  to service_role;
