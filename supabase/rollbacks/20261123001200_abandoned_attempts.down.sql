-- Rolls back 20261123001200_abandoned_attempts.sql: abandoned attempts are no longer recorded.
begin;
drop function public.record_abandoned_attempt(uuid, jsonb);
delete from supabase_migrations.schema_migrations where version = '20261123001200';
commit;
