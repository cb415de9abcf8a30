-- Rolls back 20261122000600_batched_worker_calls.sql: workers complete runs one call each again.
-- claim_runs keeps the body of 20261122000600: it has the same signature and results as the one
-- of 20261122000400 (it only admits in user order and marks admission in the claiming update),
-- and 20261122000400's rollback drops it.
begin;
drop function if exists public.complete_runs(jsonb);
delete from supabase_migrations.schema_migrations where version = '20261122000600';
commit;
