-- Two corrections a review of what the worker reports and what clients may attach found.
--
-- 1. fail_attempt says 'superseded' when the attempt it reports is no longer the run's current
--    one, instead of the run's status. A worker whose lease ran out (the run was taken over and
--    failed by another attempt, or failed as lease_expired on its last attempt) read 'failed'
--    and counted a failed run that another worker, or the claim, had already ended: the
--    worker's assistant_runs_failed_total counted such runs twice. The same call repeated (its
--    answer lost on the way: the worker retries store calls) while the run is as that call left
--    it still answers 'queued' or 'failed' as the first time. Nothing else changes: the
--    attempt's failed event is still recorded.
-- 2. A file attached to a message must belong to that message's thread. The insert policy of
--    assistant_files (20261122000300) checked only that the message is the user's own, so a
--    file could name a thread and a message of another of the user's threads. A trigger, for
--    every role and on update too, with a refusal that says why; rows written before are left
--    as they are.

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


create function public.assistant_files_message_in_thread() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  -- Runs as the writer: a client sees only its own messages, so another user's message is
  -- refused the same way as a message of another thread.
  if not exists (select 1 from public.assistant_messages m
                  where m.id = new.message_id and m.thread_id = new.thread_id) then
    raise exception 'a file can only be attached to a message of its own thread'
      using errcode = '23503',
            hint = 'message_id must be a message of the thread named by thread_id, or null';
  end if;
  return new;
end
$$;

create trigger assistant_files_message_in_thread
  before insert or update of message_id, thread_id on public.assistant_files
  for each row
  when (new.message_id is not null)
  execute function public.assistant_files_message_in_thread();

revoke execute on function public.assistant_files_message_in_thread() from public, anon, authenticated;
