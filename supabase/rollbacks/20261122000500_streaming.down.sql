-- Rolls back 20261122000500_streaming.sql: clients can no longer join their threads' private
-- broadcast topics (replies still arrive, without streaming).
begin;
drop function if exists public.assistant_schema_version();
drop policy if exists "users receive the broadcasts of their own threads" on realtime.messages;
delete from supabase_migrations.schema_migrations where version = '20261122000500';
commit;
