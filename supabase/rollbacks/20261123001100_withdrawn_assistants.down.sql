-- Rolls back 20261123001100_withdrawn_assistants.sql: a withdrawn assistant answers its threads again.
begin;
drop trigger assistants_after_withdrawal on public.assistants;
drop function public.assistants_after_withdrawal();
drop trigger assistant_messages_guard_assistant on public.assistant_messages;
drop function public.assistant_messages_guard_assistant();
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
delete from supabase_migrations.schema_migrations where version = '20261123001100';
commit;
