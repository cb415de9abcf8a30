-- Rolls back 20261122000100_core_schema.sql (run the newer rollbacks first): drops the threads,
-- messages, runs and inference events, with all their data.
begin;
alter publication supabase_realtime drop table public.assistant_threads, public.assistant_messages;
drop table if exists public.assistant_inference_events;
drop table if exists public.assistant_runs;
drop table if exists public.assistant_messages;
drop table if exists public.assistant_threads;
drop function if exists public.assistant_messages_after_insert();
drop function if exists public.assistant_messages_guard_insert();
drop function if exists public.assistant_threads_guard_update();
drop function if exists public.assistant_touch_updated_at();
drop function if exists public.assistant_is_client();
delete from supabase_migrations.schema_migrations where version = '20261122000100';
commit;
