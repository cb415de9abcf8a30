-- A withdrawn assistant no longer answers.
--
-- Deactivating an assistant, or offering it to members only, hid it from the users it was no
-- longer offered to (the assistants' RLS), but threads already with it went on being answered by
-- it: a new message in such a thread was queued and answered as before. Now
--
-- 1. a client's new message in a thread whose assistant is not offered to it (inactive, or
--    members-only for a guest) is refused at insert, with the reason and what to do (move the
--    thread to another assistant, or start a new one); the check runs with the caller's rights,
--    so the assistants' RLS decides what is offered, exactly as for picking an assistant;
-- 2. withdrawing an assistant ends the runs still queued in its threads (all of them when it is
--    deactivated, those of guests when it becomes members-only) as failed, with error_code
--    assistant_unavailable, a reply that says so and a failed event; nothing is sent to the
--    model. Runs in progress finish: they were admitted while the assistant was offered;
-- 3. the worker refuses a run whose assistant is inactive (a run that went back to the queue
--    after a failed attempt), with the same code.

create function public.assistant_messages_guard_assistant() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  chosen uuid;
begin
  select coalesce(t.assistant_id, public.default_assistant_id()) into chosen
    from public.assistant_threads t where t.id = new.thread_id;
  -- No assistant at all (none is the default): the worker's own settings answer.
  if chosen is not null and not exists (select 1 from public.assistants a where a.id = chosen) then
    raise exception 'the assistant of thread % is no longer available to you', new.thread_id
      using errcode = '42501',
            hint = 'move the thread to another assistant (set its assistant_id) or start a new thread';
  end if;
  return new;
end
$$;

revoke execute on function public.assistant_messages_guard_assistant() from public, anon, authenticated;

-- Fires after assistant_messages_guard_insert (which refuses a thread that is not the user's)
-- and before assistant_messages_open_requests: triggers fire in name order.
create trigger assistant_messages_guard_assistant
  before insert on public.assistant_messages
  for each row
  when (new.role = 'user' and public.assistant_is_client())
  execute function public.assistant_messages_guard_assistant();

create or replace function public.assistant_failure_text(p_error_code text) returns text
language sql immutable
set search_path = ''
as $$
  select case p_error_code
    when 'assistant_unavailable' then
      'Sorry, this assistant is no longer available. Move the conversation to another assistant or start a new one.'
    else 'Sorry, I could not produce a reply this time: ' || case p_error_code
      when 'rate_limited' then 'the model service is busy.'
      when 'provider_unavailable' then 'the model service is unavailable.'
      when 'timeout' then 'the model took too long to answer.'
      when 'model_failed' then 'the model failed on this request.'
      when 'invalid_output' then 'the model returned an unusable answer.'
      when 'unauthorized' then 'the assistant is not configured correctly.'
      when 'billing_required' then 'the assistant''s model account needs attention.'
      when 'invalid_input' then 'the request could not be sent to the model.'
      when 'lease_expired' then 'the assistant stopped while working on it.'
      when 'model_not_found' then 'the assistant''s model is not available.'
      when 'byok_token_invalid' then 'Replicate refused your API token; update it in your settings.'
      when 'byok_billing_required' then 'your Replicate account needs billing attention.'
      when 'byok_token_missing' then 'your plan uses your own Replicate API token, and none is set.'
      when 'byok_token_unreadable' then 'your stored Replicate token cannot be read; set it again in your settings.'
      else 'an unexpected error occurred.'
    end || ' Please try again.'
  end
$$;

-- SECURITY DEFINER: whoever withdraws the assistant (the service role, an operator in the SQL
-- editor) ends runs and writes replies and events, which only the worker's functions do.
create function public.assistants_after_withdrawal() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  run public.assistant_runs;
begin
  for run in
    select r.* from public.assistant_runs r
      join public.assistant_threads t on t.id = r.thread_id
      join auth.users u on u.id = r.user_id
     where t.assistant_id = new.id and r.status = 'queued'
       and (not new.is_active or (new.offered_to = 'members' and coalesce(u.is_anonymous, false)))
     order by r.id
       for update of r
  loop
    insert into public.assistant_inference_events
      (user_id, thread_id, message_id, run_id, attempt, provider, model, status, error_code)
    values (run.user_id, run.thread_id, run.message_id, run.id, run.attempts + 1, 'replicate', 'not_started',
            'failed', 'assistant_unavailable')
    on conflict (run_id, attempt) where run_id is not null do nothing;
    perform public.assistant_finish_failed(run.id, 'assistant_unavailable',
      format('assistant %s was withdrawn while the request was queued', new.slug));
  end loop;
  return null;
end
$$;

revoke execute on function public.assistants_after_withdrawal() from public, anon, authenticated;

create trigger assistants_after_withdrawal
  after update of is_active, offered_to on public.assistants
  for each row
  when ((old.is_active and not new.is_active) or (old.offered_to = 'everyone' and new.offered_to = 'members'))
  execute function public.assistants_after_withdrawal();
