-- A cancellation that comes while shutdown gives its run back ends the run cancelled.
--
-- cancel_run on a run in progress only flags it; the worker stops it within a second. If the
-- attempt was given back at shutdown (release_run) before the worker acted, the run went back to
-- the queue with its flag set, was claimed again, and a new prediction was made, and charged,
-- for a request its user had cancelled. release_run now ends a flagged run cancelled instead of
-- giving it back (fail_attempt does the same since 20261123000600). A run cancelled while queued
-- ends at once, as before, so no flagged run is left in the queue.

create or replace function public.release_run(p_run_id uuid, p_worker text, p_attempt integer) returns boolean
language plpgsql
set search_path = ''
as $$
declare
  run public.assistant_runs;
begin
  select * into run from public.assistant_runs
   where id = p_run_id and status = 'in_progress' and lease_owner = p_worker and attempts = p_attempt
     for update;
  if not found then
    return false;
  end if;
  if run.cancel_requested_at is not null then
    perform public.finish_cancelled(p_run_id, null);  -- its user cancelled it meanwhile: not queued again
    return true;
  end if;
  update public.assistant_runs
     set status = 'queued', attempts = attempts - 1, lease_owner = null, lease_expires_at = null,
         next_attempt_at = now()
   where id = p_run_id;
  return true;
end
$$;
