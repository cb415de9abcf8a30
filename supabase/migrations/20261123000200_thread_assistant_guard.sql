-- Closes two gaps a security review found in what clients may do.
--
-- 1. A thread's assistant can only be one the user is offered, on update as on insert. The
--    insert policy (20261122000300) checks that the assistant is visible to the user (the
--    assistants' RLS: active, and offered to everyone or the user is not a guest), but the update
--    policy and assistant_threads_guard_update did not look at assistant_id, added after them: a
--    guest could move a thread to a members-only or inactive assistant and be answered by it.
--    Moving a thread to another offered assistant (or to none, which means the default) stays
--    allowed. A trigger of its own, so that the existing guard and the update policy stay as
--    they are: a thread whose assistant was withdrawn later can still be renamed and archived.
--    The existing guard's refusal now names assistant_id among what a client may change.
--    A thread without an assistant is answered by the default one: the default assistant must
--    therefore be active and offered to everyone, or moving a thread to none (or a thread made
--    before any assistant was picked) would reach what the user is not offered.
-- 2. default_assistant_id() is executed by signed-in users only (it is the column default of
--    assistant_threads.assistant_id); anon has no insert on threads and no reason to call it.

create function public.assistant_threads_guard_assistant() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  -- Runs as the client (not security definer), so the assistants' RLS decides what is offered,
  -- exactly as in the insert policy.
  if public.assistant_is_client()
     and not exists (select 1 from public.assistants a where a.id = new.assistant_id) then
    raise exception 'this assistant is not offered to you'
      using errcode = '42501',
            hint = 'a thread can only be moved to an active assistant offered to your account';
  end if;
  return new;
end
$$;

create trigger assistant_threads_guard_assistant
  before update of assistant_id on public.assistant_threads
  for each row
  when (new.assistant_id is distinct from old.assistant_id and new.assistant_id is not null)
  execute function public.assistant_threads_guard_assistant();

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
    raise exception 'only the title, archived_at and assistant_id of a thread can be changed'
      using errcode = '42501',
            hint = 'id, user_id, created_at and last_message_at are maintained by the server';
  end if;
  new.updated_at := now();
  return new;
end
$$;

alter table public.assistants
  add constraint assistants_default_is_active_and_offered_to_everyone
  check (not is_default or (is_active and offered_to = 'everyone'));

revoke execute on function public.assistant_threads_guard_assistant() from public, anon, authenticated;
revoke execute on function public.default_assistant_id() from public, anon;
grant execute on function public.default_assistant_id() to authenticated, service_role;
