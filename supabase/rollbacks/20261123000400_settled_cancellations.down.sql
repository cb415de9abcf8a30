-- Rolls back 20261123000400_settled_cancellations.sql: cancelled events are no longer filled in
-- once a held create answers, and finish_cancelled is again the body of 20261122000400.
begin;
drop function public.record_cancelled_consumption(uuid, jsonb);
create or replace function public.finish_cancelled(p_run_id uuid, p_consumed jsonb) returns void
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
delete from supabase_migrations.schema_migrations where version = '20261123000400';
commit;
