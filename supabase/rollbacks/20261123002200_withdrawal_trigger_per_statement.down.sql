-- Rolls back 20261123002200_withdrawal_trigger_per_statement.sql: the row trigger and its function
-- as 20261123001000 and 20261123001900 left them.
begin;

drop trigger assistants_after_withdrawal on public.assistants;

create or replace function public.assistants_after_withdrawal() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  run public.assistant_runs;
  ids uuid[];
begin
  -- Their threads and messages, then all the runs, before the first reply (see 6): the lock
  -- order of every writer, and replies in thread order, as the claim and completions write them.
  -- A run queued after this look is ended by the claim that takes it (20261123001400).
  ids := array(
    select r.id from public.assistant_runs r
      join public.assistant_threads t on t.id = r.thread_id
      join auth.users u on u.id = r.user_id
     where t.assistant_id = new.id and r.status = 'queued'
       and (not new.is_active or (new.offered_to = 'members' and coalesce(u.is_anonymous, false))));
  perform public.assistant_lock_requests(ids);
  perform 1 from public.assistant_runs r where r.id = any(ids) order by r.thread_id, r.id for update;
  for run in
    select r.* from public.assistant_runs r
     where r.id = any(ids) and r.status = 'queued'  -- still queued, now that it is locked
     order by r.thread_id, r.id
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

create trigger assistants_after_withdrawal
  after update of is_active, offered_to on public.assistants
  for each row
  when ((old.is_active and not new.is_active) or (old.offered_to = 'everyone' and new.offered_to = 'members'))
  execute function public.assistants_after_withdrawal();

delete from supabase_migrations.schema_migrations where version = '20261123002200';
commit;
