-- Rolls back 20261123000700_usage_window_retention.sql: usage windows are kept for ever again.
begin;
drop function public.prune_usage_windows(interval, interval, integer);
drop index public.idx_ai_usage_windows_window_start;
delete from supabase_migrations.schema_migrations where version = '20261123000700';
commit;
