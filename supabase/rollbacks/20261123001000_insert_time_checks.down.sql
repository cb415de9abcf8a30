-- Rolls back 20261123001000_insert_time_checks.sql: client inserts are no longer capped, and a
-- withdrawn assistant answers its threads again.
begin;
drop trigger assistants_after_withdrawal on public.assistants;
drop function public.assistants_after_withdrawal();
drop trigger assistant_messages_queue_cap on public.assistant_messages;
drop function public.assistant_messages_cap_queued_requests();
create or replace function public.assistant_messages_guard_insert() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  thread_owner uuid;
  thread_archived timestamptz;
begin
  -- Runs with the caller's rights: a client sees only its own threads.
  select t.user_id, t.archived_at into thread_owner, thread_archived
    from public.assistant_threads t where t.id = new.thread_id;

  if not public.assistant_is_client() then
    new.user_id := coalesce(new.user_id, thread_owner);
    if thread_owner is not null and new.user_id <> thread_owner then
      raise exception 'a message''s user_id must be the owner of its thread'
        using errcode = '23514';
    end if;
    return new;
  end if;

  if auth.uid() is null then
    raise exception 'sign in to write messages' using errcode = '42501';
  end if;
  if new.role is distinct from 'user' then
    raise exception 'clients may only write messages with role ''user'' (got %)',
      coalesce(quote_literal(new.role), 'null')
      using errcode = '42501',
            hint = 'assistant, system and tool messages are written by the server';
  end if;
  if new.user_id is distinct from auth.uid() then
    raise exception 'user_id must be your own user id' using errcode = '42501';
  end if;
  if thread_owner is null then
    raise exception 'thread % not found', new.thread_id
      using errcode = '42501', hint = 'messages can only be added to your own threads';
  end if;
  if thread_archived is not null then
    raise exception 'thread % is archived', new.thread_id
      using errcode = '42501', hint = 'unarchive it (set archived_at to null) to continue it';
  end if;
  if new.reply_to is not null or new.token_count is not null or new.model is not null
     or new.latency_ms is not null then
    raise exception 'reply_to, token_count, model and latency_ms are set by the server'
      using errcode = '42501';
  end if;
  -- Clients do not pick their own timestamps: history order is the server's.
  new.created_at := now();
  return new;
end
$$;
create or replace function public.assistant_failure_text(p_error_code text) returns text
language sql immutable
set search_path = ''
as $$
  select 'Sorry, I could not produce a reply this time: ' || case p_error_code
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
$$;
drop index public.idx_assistant_runs_queued_by_user;
alter table public.ai_plans drop constraint ai_plans_max_queued_requests_positive;
alter table public.ai_plans drop column max_queued_requests;
delete from supabase_migrations.schema_migrations where version = '20261123001000';
commit;
