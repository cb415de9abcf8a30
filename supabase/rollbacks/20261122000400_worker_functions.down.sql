-- Rolls back 20261122000400_worker_functions.sql. Not a migration: run it by hand
-- (psql or the SQL editor), newest rollback first. It also removes the migration from the CLI's
-- history, so `supabase db push` would apply it again.
begin;
drop function if exists public.run_queue_status();
drop function if exists public.extend_lease(uuid, text, integer, integer);
drop function if exists public.release_run(uuid, text, integer);
drop function if exists public.fail_attempt(uuid, integer, text, text, boolean, double precision, text, text, text, integer);
drop function if exists public.complete_run(uuid, integer, text, text, text, text, integer, integer, numeric, integer,
                                            jsonb, jsonb, jsonb, integer);
drop function if exists public.cancelled_runs(jsonb);
drop function if exists public.cancel_run(uuid);
drop function if exists public.claim_runs(text, integer, integer, text, text);
drop function if exists public.assistant_finish_blocked(uuid, jsonb, text);
drop function if exists public.assistant_finish_failed(uuid, text, text);
drop function if exists public.finish_cancelled(uuid, jsonb);
drop function if exists public.assistant_failure_text(text);
delete from supabase_migrations.schema_migrations where version = '20261122000400';
commit;
