-- Rolls back 20261123000800_deleted_requests_are_charged.sql: a run deleted meanwhile is again
-- dropped without a record, cancelled_runs names only flagged runs, finish_cancelled returns
-- nothing (the body of 20261123000400).
begin;
drop function public.record_orphaned_consumption(uuid, uuid, jsonb);
drop index public.idx_assistant_events_orphaned_prediction;
drop trigger assistant_runs_deleted_in_progress on public.assistant_runs;
drop function public.assistant_runs_after_delete();
create or replace function public.cancelled_runs(p_run_ids jsonb) returns table (run_id uuid)
language sql stable
set search_path = ''
as $$
  select r.id from public.assistant_runs r
   where r.id in (select value::uuid from jsonb_array_elements_text(p_run_ids))
     and r.cancel_requested_at is not null and r.status = 'in_progress'
$$;
drop function public.finish_cancelled(uuid, jsonb);
create function public.finish_cancelled(p_run_id uuid, p_consumed jsonb) returns void
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
revoke execute on function public.finish_cancelled(uuid, jsonb) from public, anon, authenticated;
grant execute on function public.finish_cancelled(uuid, jsonb) to service_role;
delete from supabase_migrations.schema_migrations where version = '20261123000800';
commit;
