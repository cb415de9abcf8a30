-- Rolls back 20261123001100_vault_secrets_follow_tokens.sql: a deleted token row leaves its Vault secret.
begin;
drop trigger user_replicate_tokens_drop_secret on public.user_replicate_tokens;
drop function public.user_replicate_tokens_drop_secret();
delete from supabase_migrations.schema_migrations where version = '20261123001100';
commit;
