-- Rolls back 20261122000200_usage_limits.sql (run the newer rollbacks first). Drops plans,
-- settings, usage counters, BYOK tokens (Vault secrets named replicate_token_<user> are deleted
-- too where Vault exists), operator reports and feedback, with their data.
begin;
do $$
begin
  if to_regnamespace('vault') is not null then
    execute 'delete from vault.secrets where id in (select vault_secret_id from public.user_replicate_tokens
                                                      where vault_secret_id is not null)';
  end if;
end
$$;
drop trigger if exists on_auth_user_created_ai_settings on auth.users;
drop trigger if exists on_auth_user_converted_ai_settings on auth.users;
drop view if exists public.ai_feedback_summary;
drop table if exists public.ai_feedback;
drop function if exists public.ai_feedback_guard();
drop function if exists public.refresh_ai_usage_reports();
drop view if exists public.ai_usage_today;
drop materialized view if exists public.ai_usage_monthly;
drop materialized view if exists public.ai_usage_daily;
drop function if exists public.my_ai_usage();
drop function if exists public.pending_replicate_tokens(integer);
drop function if exists public.store_encrypted_replicate_token(uuid, integer, text);
drop function if exists public.get_replicate_token(uuid);
drop function if exists public.my_replicate_token_status();
drop function if exists public.set_my_replicate_token(text);
drop table if exists public.user_replicate_tokens;
drop function if exists public.ai_refusal_text(jsonb);
drop function if exists public.admit_request(uuid, boolean);
drop function if exists public.ai_usage_add(uuid, jsonb);
drop function if exists public.ai_window_end(text, timestamptz);
drop function if exists public.ai_window_start(text, timestamptz);
drop table if exists public.ai_usage_counters;
drop function if exists public.ai_plan_of(uuid);
drop table if exists public.user_ai_settings;
drop function if exists public.user_ai_settings_guard_update();
drop function if exists public.ai_settings_for_converted_guest();
drop function if exists public.ai_settings_for_new_user();
drop function if exists public.ai_default_plan(boolean);
drop table if exists public.ai_plan_limits;
drop table if exists public.ai_plans;
delete from supabase_migrations.schema_migrations where version = '20261122000200';
commit;
