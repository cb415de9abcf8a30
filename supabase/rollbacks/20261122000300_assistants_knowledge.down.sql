-- Rolls back 20261122000300_assistants_knowledge.sql (run 20261122000400's rollback first).
-- Drops assistants, profiles, the knowledge base, attachments rows, follow-ups and action
-- requests with their data. The `vector` extension stays (other schemas may use it). The
-- chat-attachments bucket is removed only if empty and if Storage allows deleting it from SQL;
-- otherwise delete it in the dashboard.
begin;
alter publication supabase_realtime drop table public.assistant_follow_ups, public.assistant_action_requests;

drop policy if exists "users create threads for themselves" on public.assistant_threads;
create policy "users create threads for themselves" on public.assistant_threads
  for insert to authenticated with check (user_id = (select auth.uid()));

drop policy if exists "users read their own attachments" on storage.objects;
drop policy if exists "users upload attachments into their own folder" on storage.objects;
drop policy if exists "users replace their own attachments" on storage.objects;
drop policy if exists "users delete their own attachments" on storage.objects;
do $$
begin
  delete from storage.buckets where id = 'chat-attachments';
exception when others then
  raise notice 'bucket chat-attachments left in place (%): delete it in the dashboard', sqlerrm;
end
$$;

drop function if exists public.apply_profile_preferences(uuid, jsonb);
drop function if exists public.register_action_types(jsonb);
drop function if exists public.finish_action_request(uuid, boolean, jsonb, text);
drop function if exists public.claim_action_requests(text, integer, integer);
drop table if exists public.assistant_action_requests;
drop function if exists public.assistant_action_requests_guard_update();
drop table if exists public.assistant_action_types;
drop table if exists public.assistant_follow_ups;
drop function if exists public.assistant_follow_ups_guard_update();
drop table if exists public.assistant_files;
drop function if exists public.attachment_object(text, text);
drop function if exists public.kb_document_hashes(uuid);
drop function if exists public.kb_upsert_document(text, text, text, jsonb, uuid, jsonb);
drop function if exists public.search_knowledge(text, extensions.vector, uuid, uuid, uuid, double precision, integer);
drop function if exists public.match_kb_chunks(extensions.vector, double precision, integer, uuid);
drop table if exists public.kb_searches;
drop table if exists public.kb_chunks;
drop table if exists public.kb_documents;
drop table if exists public.ai_profiles;
alter table public.assistant_messages drop constraint if exists assistant_messages_image_url_is_https_or_storage;
alter table public.assistant_threads drop column if exists assistant_id;
drop table if exists public.assistant_guided_questions;
drop function if exists public.assistant_id_by_slug(text);
drop function if exists public.default_assistant_id();
drop table if exists public.assistants;
delete from supabase_migrations.schema_migrations where version = '20261122000300';
commit;
