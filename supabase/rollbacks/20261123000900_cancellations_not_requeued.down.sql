-- Rolls back 20261123000900_cancellations_not_requeued.sql: release_run is again the body of
-- 20261122000400 (a flagged run goes back to the queue).
begin;
create or replace function public.release_run(p_run_id uuid, p_worker text, p_attempt integer) returns boolean
language sql
set search_path = ''
as $$
  with released as (
    update public.assistant_runs
       set status = 'queued', attempts = attempts - 1, lease_owner = null, lease_expires_at = null,
           next_attempt_at = now()
     where id = p_run_id and status = 'in_progress' and lease_owner = p_worker and attempts = p_attempt
    returning true
  )
  select exists (select 1 from released)
$$;
delete from supabase_migrations.schema_migrations where version = '20261123000900';
commit;
