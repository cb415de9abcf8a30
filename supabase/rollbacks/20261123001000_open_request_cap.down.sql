-- Rolls back 20261123001000_open_request_cap.sql: client inserts are no longer capped.
begin;
drop trigger assistant_messages_open_requests on public.assistant_messages;
drop function public.assistant_messages_cap_open_requests();
drop index public.idx_assistant_runs_open_by_user;
alter table public.ai_plans drop constraint ai_plans_max_open_requests_positive;
alter table public.ai_plans drop column max_open_requests;
delete from supabase_migrations.schema_migrations where version = '20261123001000';
commit;
