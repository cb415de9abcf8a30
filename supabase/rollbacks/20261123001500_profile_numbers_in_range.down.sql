-- Rolls back 20261123001500_profile_numbers_in_range.sql.
begin;

alter table public.ai_profiles drop constraint ai_profiles_numbers_in_range;

delete from supabase_migrations.schema_migrations where version = '20261123001500';
commit;
