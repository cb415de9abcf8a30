-- Rolls back 20261123000400_settled_cancellations.sql: cancelled events are no longer filled in
-- once a held create answers.
begin;
drop function public.record_cancelled_consumption(uuid, jsonb);
delete from supabase_migrations.schema_migrations where version = '20261123000400';
commit;
