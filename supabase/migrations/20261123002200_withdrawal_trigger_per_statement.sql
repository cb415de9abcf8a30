-- The trigger that ends a withdrawn assistant's queued runs runs once per statement.
--
-- It was a row trigger (20261123001000): an `update` withdrawing several assistants ended each
-- one's queued runs in turn, locking and writing the replies of the first assistant's threads
-- before it locked the second's. Within each assistant it kept thread order (20261123001900, 6),
-- but across two it could cross a completion batch writing in two of the same threads (one reply
-- in a thread of the second assistant, then one in a thread of the first): a deadlock, one side
-- rolled back after a second.
--
-- Now one statement-level trigger, with the statement's old and new rows (transition tables),
-- finds the queued runs of every assistant the statement withdrew (made inactive, or offered to
-- members only: then the runs of guests), locks them all as every writer does (accounts, threads,
-- messages, then the runs, 20261123002100) and writes their replies in thread order, whatever
-- the number of assistants. Transition tables cannot go with a column list or a WHEN clause, so
-- the trigger fires on every update of public.assistants and looks for the withdrawals itself;
-- assistants are an operator's table, changed rarely.

create or replace function public.assistants_after_withdrawal() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  run record;
  ids uuid[];
begin
  -- A run queued after this look is ended by the claim that takes it (20261123001400).
  ids := array(
    select r.id from old_rows o
      join new_rows n on n.id = o.id
      join public.assistant_threads t on t.assistant_id = n.id
      join public.assistant_runs r on r.thread_id = t.id
      join auth.users u on u.id = r.user_id
     where ((o.is_active and not n.is_active) or (o.offered_to = 'everyone' and n.offered_to = 'members'))
       and r.status = 'queued'
       and (not n.is_active or (n.offered_to = 'members' and coalesce(u.is_anonymous, false))));
  if cardinality(ids) = 0 then
    return null;
  end if;
  -- Their accounts, threads and messages, then all the runs, before the first reply: the lock
  -- order of every writer, and replies in thread order, as the claim and completions write them.
  perform public.assistant_lock_requests(ids);
  perform 1 from public.assistant_runs r where r.id = any(ids) order by r.thread_id, r.id for update;
  for run in
    select r.id, r.user_id, r.thread_id, r.message_id, r.attempts, a.slug
      from public.assistant_runs r
      join public.assistant_threads t on t.id = r.thread_id
      join public.assistants a on a.id = t.assistant_id
     where r.id = any(ids) and r.status = 'queued'  -- still queued, now that it is locked
     order by r.thread_id, r.id
  loop
    insert into public.assistant_inference_events
      (user_id, thread_id, message_id, run_id, attempt, provider, model, status, error_code)
    values (run.user_id, run.thread_id, run.message_id, run.id, run.attempts + 1, 'replicate', 'not_started',
            'failed', 'assistant_unavailable')
    on conflict (run_id, attempt) where run_id is not null do nothing;
    perform public.assistant_finish_failed(run.id, 'assistant_unavailable',
      format('assistant %s was withdrawn while the request was queued', run.slug));
  end loop;
  return null;
end
$$;

drop trigger assistants_after_withdrawal on public.assistants;
create trigger assistants_after_withdrawal
  after update on public.assistants
  referencing old table as old_rows new table as new_rows
  for each statement
  execute function public.assistants_after_withdrawal();
