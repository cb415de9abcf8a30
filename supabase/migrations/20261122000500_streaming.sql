-- Streaming replies: the worker broadcasts the growing text of a reply over Supabase Realtime
-- Broadcast to the private topic `thread:<thread id>` (no database row per token). Realtime
-- lets a client join a private channel only if RLS on realtime.messages allows it for that
-- topic: here, only the owner of the thread.
create policy "users receive the broadcasts of their own threads" on realtime.messages
  for select to authenticated
  using (
    extension = 'broadcast'
    and (select realtime.topic()) like 'thread:%'
    and exists (
      select 1 from public.assistant_threads t
       where t.id::text = split_part((select realtime.topic()), ':', 2)
         and t.user_id = (select auth.uid())
    )
  );

-- The newest migration applied to this database (python -m worker doctor compares it with its own).
create function public.assistant_schema_version() returns text
language plpgsql stable
security definer
set search_path = ''
as $$
begin
  if to_regclass('supabase_migrations.schema_migrations') is null then
    return null;
  end if;
  return (select max(version) from supabase_migrations.schema_migrations);
end
$$;

revoke execute on function public.assistant_schema_version() from public, anon, authenticated;
grant execute on function public.assistant_schema_version() to service_role;
