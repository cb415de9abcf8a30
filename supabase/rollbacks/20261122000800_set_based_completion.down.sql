-- Rolls back 20261122000800_set_based_completion.sql: complete_run gets back its own body (that
-- of 20261122000400), which does not call complete_runs (20261122000600's rollback drops that).
-- complete_runs and ai_usage_add keep their bodies: same arguments, results and errors as before,
-- and the rollbacks of 20261122000600 and 20261122000700 drop or replace them.
begin;
create or replace function public.complete_run(
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

delete from supabase_migrations.schema_migrations where version = '20261122000800';
commit;
