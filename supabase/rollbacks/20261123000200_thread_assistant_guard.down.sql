-- Rolls back 20261123000200_thread_assistant_guard.sql.
begin;
drop trigger assistant_threads_guard_assistant on public.assistant_threads;
drop function public.assistant_threads_guard_assistant();
alter table public.assistants drop constraint assistants_default_is_active_and_offered_to_everyone;
grant execute on function public.default_assistant_id() to public, anon;
create or replace function public.assistant_threads_guard_update() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if public.assistant_is_client() and (
       new.id is distinct from old.id
    or new.user_id is distinct from old.user_id
    or new.created_at is distinct from old.created_at
    or new.last_message_at is distinct from old.last_message_at
  ) then
    raise exception 'only title and archived_at of a thread can be changed'
      using errcode = '42501',
            hint = 'id, user_id, created_at and last_message_at are maintained by the server';
  end if;
  new.updated_at := now();
  return new;
end
$$;
delete from supabase_migrations.schema_migrations where version = '20261123000200';
commit;
