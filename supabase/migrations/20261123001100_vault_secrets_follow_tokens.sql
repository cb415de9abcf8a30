-- A BYOK token's Vault secret goes with its row.
--
-- set_my_replicate_token(null) deleted the Vault secret, but a row deleted any other way did
-- not: deleting the user (auth.users cascades to user_replicate_tokens), or an operator deleting
-- the row, left the token in vault.secrets for ever, readable with the owner's rights. The secret
-- is now deleted with the row, and the old one when a row is pointed at another secret.

create function public.user_replicate_tokens_drop_secret() returns trigger
language plpgsql
security definer  -- vault.secrets belongs to the owner, as in set_my_replicate_token
set search_path = ''
as $$
begin
  if old.vault_secret_id is not null
     and (tg_op = 'DELETE' or new.vault_secret_id is distinct from old.vault_secret_id)
     and to_regclass('vault.secrets') is not null then
    execute 'delete from vault.secrets where id = $1' using old.vault_secret_id;
  end if;
  return null;
end
$$;

revoke execute on function public.user_replicate_tokens_drop_secret() from public, anon, authenticated;

create trigger user_replicate_tokens_drop_secret
  after delete or update of vault_secret_id on public.user_replicate_tokens
  for each row execute function public.user_replicate_tokens_drop_secret();
