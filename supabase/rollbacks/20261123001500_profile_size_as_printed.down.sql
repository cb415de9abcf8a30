-- Rolls back 20261123001500_profile_size_as_printed.sql.
begin;

alter table public.ai_profiles drop constraint ai_profiles_at_most_4kb_as_text;

delete from supabase_migrations.schema_migrations where version = '20261123001500';
commit;
