-- Rolls back 20261122000800_set_based_completion.sql. complete_runs and ai_usage_add keep their
-- bodies: same arguments, results and errors as before, and the rollbacks of 20261122000600 and
-- 20261122000700 drop or replace them.
begin;
delete from supabase_migrations.schema_migrations where version = '20261122000800';
commit;
