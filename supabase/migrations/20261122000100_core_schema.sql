-- Core schema: threads, messages, inference events (seed 000) and the worker's run state.
-- Runs unchanged on a hosted Supabase project (`supabase db push`) and on the embedded local
-- database, which is prepared like a Supabase database beforehand.

-------------------------------------------------------------------------------------------------
-- Threads
-------------------------------------------------------------------------------------------------
create table public.assistant_threads (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
  title text null,
  archived_at timestamptz null,
  last_message_at timestamptz null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint assistant_threads_title_at_most_120_chars
    check (title is null or char_length(title) <= 120)
);

comment on table public.assistant_threads is
  'A conversation of one user with the assistant. Archived threads (archived_at set) stay readable but take no new messages.';

create index idx_assistant_threads_user_created_at
  on public.assistant_threads (user_id, created_at desc);
-- "My latest threads": ordered by activity, archived ones filtered out.
create index idx_assistant_threads_user_last_message_at
  on public.assistant_threads (user_id, last_message_at desc nulls last)
  where archived_at is null;

-------------------------------------------------------------------------------------------------
-- Messages
-------------------------------------------------------------------------------------------------
create table public.assistant_messages (
  id uuid primary key default gen_random_uuid(),
  thread_id uuid not null references public.assistant_threads (id) on delete cascade,
  user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
  role text not null,
  content text not null,
  image_url text null,
  metadata_json jsonb not null default '{}'::jsonb,
  -- The user message this assistant message answers: unique, so no message gets two replies.
  reply_to uuid null unique,
  token_count integer null,
  model text null,
  latency_ms integer null,
  created_at timestamptz not null default now(),
  constraint assistant_messages_role_is_user_assistant_system_or_tool
    check (role in ('user', 'assistant', 'system', 'tool')),
  constraint assistant_messages_content_between_1_and_8000_chars
    check (char_length(content) between 1 and 8000),
  constraint assistant_messages_image_url_between_1_and_2048_chars
    check (image_url is null or char_length(image_url) between 1 and 2048),
  constraint assistant_messages_metadata_json_is_object_of_at_most_16kb
    check (jsonb_typeof(metadata_json) = 'object' and pg_column_size(metadata_json) <= 16384),
  constraint assistant_messages_only_assistant_messages_reply
    check (reply_to is null or role = 'assistant'),
  constraint assistant_messages_token_count_not_negative
    check (token_count is null or token_count >= 0),
  constraint assistant_messages_latency_ms_not_negative
    check (latency_ms is null or latency_ms >= 0),
  -- Lets reply_to reference (message, thread): a reply always sits in the thread it answers.
  constraint assistant_messages_id_thread_key unique (id, thread_id),
  constraint assistant_messages_reply_to_same_thread
    foreign key (reply_to, thread_id)
    references public.assistant_messages (id, thread_id) on delete cascade
);

comment on column public.assistant_messages.reply_to is
  'For an assistant reply: the user message it answers. Unique: a user message never has two replies.';

create index idx_assistant_messages_thread_created_at
  on public.assistant_messages (thread_id, created_at asc);
create index idx_assistant_messages_user_created_at
  on public.assistant_messages (user_id, created_at desc);

-------------------------------------------------------------------------------------------------
-- Runs: the worker's state for one user message (kept off the message row so that clients
-- subscribed to messages are not sent an UPDATE for every claim, lease renewal or retry).
-------------------------------------------------------------------------------------------------
create table public.assistant_runs (
  id uuid primary key default gen_random_uuid(),
  message_id uuid not null unique references public.assistant_messages (id) on delete cascade,
  thread_id uuid not null references public.assistant_threads (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,
  status text not null default 'queued',
  attempts integer not null default 0,
  max_attempts integer not null default 3,
  next_attempt_at timestamptz not null default now(),
  lease_owner text null,
  lease_expires_at timestamptz null,
  admitted_at timestamptz null,
  cancel_requested_at timestamptz null,
  last_error_code text null,
  last_error text null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  finished_at timestamptz null,
  constraint assistant_runs_status_known
    check (status in ('queued', 'in_progress', 'completed', 'failed', 'blocked', 'cancelled')),
  constraint assistant_runs_attempts_within_max
    check (attempts >= 0 and max_attempts >= 1 and attempts <= max_attempts),
  constraint assistant_runs_lease_only_in_progress
    check ((status = 'in_progress') = (lease_expires_at is not null)),
  constraint assistant_runs_last_error_at_most_2000_chars
    check (last_error is null or char_length(last_error) <= 2000)
);

comment on table public.assistant_runs is
  'Work state of the reply to one user message. Written only by the worker (service role) through SQL functions; users may read their own to show progress or an error.';

-- What a claim scans: queued runs that are due, and in-progress runs whose lease has expired.
create index idx_assistant_runs_queued_due
  on public.assistant_runs (next_attempt_at) where status = 'queued';
create index idx_assistant_runs_lease_expiry
  on public.assistant_runs (lease_expires_at) where status = 'in_progress';
create index idx_assistant_runs_user_created_at
  on public.assistant_runs (user_id, created_at desc);
create index idx_assistant_runs_thread
  on public.assistant_runs (thread_id);

-------------------------------------------------------------------------------------------------
-- Inference events (seed 000), plus the message, run, attempt and provider prediction id.
-------------------------------------------------------------------------------------------------
create table public.assistant_inference_events (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  thread_id uuid null references public.assistant_threads (id) on delete set null,
  message_id uuid null references public.assistant_messages (id) on delete set null,
  run_id uuid null references public.assistant_runs (id) on delete set null,
  attempt integer not null default 1,
  provider text not null,
  model text not null,
  prediction_id text null,
  status text not null,
  latency_ms integer null,
  input_tokens integer null,
  output_tokens integer null,
  cost_estimate_usd numeric(10, 6) null,
  time_to_first_token_ms integer null,
  error_code text null,
  safety_flags_json jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  constraint assistant_inference_events_status_known
    check (status in ('succeeded', 'failed', 'blocked', 'cancelled')),
  constraint assistant_inference_events_attempt_positive check (attempt >= 1),
  constraint assistant_inference_events_counts_not_negative
    check (coalesce(latency_ms, 0) >= 0 and coalesce(input_tokens, 0) >= 0
           and coalesce(output_tokens, 0) >= 0 and coalesce(cost_estimate_usd, 0) >= 0),
  constraint assistant_inference_events_safety_flags_is_object
    check (jsonb_typeof(safety_flags_json) = 'object')
);

create index idx_assistant_events_user_created_at
  on public.assistant_inference_events (user_id, created_at desc);
create index idx_assistant_events_model_created_at
  on public.assistant_inference_events (model, created_at desc);
-- One event per attempt of a run: recording an attempt twice (a retried completion) is a no-op.
create unique index idx_assistant_events_run_attempt
  on public.assistant_inference_events (run_id, attempt) where run_id is not null;
create index idx_assistant_events_message
  on public.assistant_inference_events (message_id);
create index idx_assistant_events_thread
  on public.assistant_inference_events (thread_id);

-------------------------------------------------------------------------------------------------
-- Triggers
-------------------------------------------------------------------------------------------------

-- Is the statement running for an app client (PostgREST's anon/authenticated roles)?
create function public.assistant_is_client() returns boolean
language sql stable
set search_path = ''
as $$
  select current_user in ('anon', 'authenticated')
$$;

create function public.assistant_touch_updated_at() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end
$$;

-- Clients may rename and archive their threads, nothing else. RLS decides *whose* threads;
-- this trigger refuses the other columns with a reason instead of a bare permission error.
create function public.assistant_threads_guard_update() returns trigger
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

create trigger assistant_threads_guard_update
  before update on public.assistant_threads
  for each row execute function public.assistant_threads_guard_update();

-- Fills the owner of server-written messages from the thread and states why a client insert is
-- refused. RLS enforces the same rules; this runs first and names the rule that was broken.
create function public.assistant_messages_guard_insert() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  thread_owner uuid;
  thread_archived timestamptz;
begin
  -- Runs with the caller's rights: a client sees only its own threads.
  select t.user_id, t.archived_at into thread_owner, thread_archived
    from public.assistant_threads t where t.id = new.thread_id;

  if not public.assistant_is_client() then
    new.user_id := coalesce(new.user_id, thread_owner);
    if thread_owner is not null and new.user_id <> thread_owner then
      raise exception 'a message''s user_id must be the owner of its thread'
        using errcode = '23514';
    end if;
    return new;
  end if;

  if auth.uid() is null then
    raise exception 'sign in to write messages' using errcode = '42501';
  end if;
  if new.role is distinct from 'user' then
    raise exception 'clients may only write messages with role ''user'' (got %)',
      coalesce(quote_literal(new.role), 'null')
      using errcode = '42501',
            hint = 'assistant, system and tool messages are written by the server';
  end if;
  if new.user_id is distinct from auth.uid() then
    raise exception 'user_id must be your own user id' using errcode = '42501';
  end if;
  if thread_owner is null then
    raise exception 'thread % not found', new.thread_id
      using errcode = '42501', hint = 'messages can only be added to your own threads';
  end if;
  if thread_archived is not null then
    raise exception 'thread % is archived', new.thread_id
      using errcode = '42501', hint = 'unarchive it (set archived_at to null) to continue it';
  end if;
  if new.reply_to is not null or new.token_count is not null or new.model is not null
     or new.latency_ms is not null then
    raise exception 'reply_to, token_count, model and latency_ms are set by the server'
      using errcode = '42501';
  end if;
  -- Clients do not pick their own timestamps: history order is the server's.
  new.created_at := now();
  return new;
end
$$;

create trigger assistant_messages_guard_insert
  before insert on public.assistant_messages
  for each row execute function public.assistant_messages_guard_insert();

-- Every user message gets its run (queued) in the same transaction, and the thread's activity
-- time moves. SECURITY DEFINER: clients can neither write runs nor last_message_at themselves.
create function public.assistant_messages_after_insert() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  run_id uuid;
begin
  update public.assistant_threads
     set last_message_at = greatest(coalesce(last_message_at, new.created_at), new.created_at)
   where id = new.thread_id;

  if new.role = 'user' then
    insert into public.assistant_runs (message_id, thread_id, user_id)
    values (new.id, new.thread_id, new.user_id)
    returning id into run_id;
    -- A wake-up hint for workers on the postgres transport (LISTEN assistant_runs).
    perform pg_notify('assistant_runs', run_id::text);
  end if;
  return null;
end
$$;

create trigger assistant_messages_after_insert
  after insert on public.assistant_messages
  for each row execute function public.assistant_messages_after_insert();

create trigger assistant_runs_touch_updated_at
  before update on public.assistant_runs
  for each row execute function public.assistant_touch_updated_at();

-------------------------------------------------------------------------------------------------
-- Privileges and Row Level Security
-------------------------------------------------------------------------------------------------
-- Supabase grants everything in `public` to anon and authenticated by default; take it back and
-- grant only what clients may do. RLS then decides on which rows.
revoke all on public.assistant_threads, public.assistant_messages,
              public.assistant_runs, public.assistant_inference_events
  from anon, authenticated;
grant select, insert, update, delete on public.assistant_threads to authenticated;
grant select, insert, delete on public.assistant_messages to authenticated;
grant select on public.assistant_runs, public.assistant_inference_events to authenticated;
grant all on public.assistant_threads, public.assistant_messages,
             public.assistant_runs, public.assistant_inference_events
  to service_role;

revoke execute on function public.assistant_messages_after_insert() from public, anon, authenticated;

alter table public.assistant_threads enable row level security;
alter table public.assistant_messages enable row level security;
alter table public.assistant_runs enable row level security;
alter table public.assistant_inference_events enable row level security;

create policy "users read their own threads" on public.assistant_threads
  for select to authenticated using (user_id = (select auth.uid()));
create policy "users create threads for themselves" on public.assistant_threads
  for insert to authenticated with check (user_id = (select auth.uid()));
create policy "users rename and archive their own threads" on public.assistant_threads
  for update to authenticated
  using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));
create policy "users delete their own threads" on public.assistant_threads
  for delete to authenticated using (user_id = (select auth.uid()));

create policy "users read their own messages" on public.assistant_messages
  for select to authenticated using (user_id = (select auth.uid()));
create policy "users write user messages into their own threads" on public.assistant_messages
  for insert to authenticated with check (
    user_id = (select auth.uid())
    and role = 'user'
    and reply_to is null
    and exists (
      select 1 from public.assistant_threads t
       where t.id = thread_id and t.user_id = (select auth.uid()) and t.archived_at is null
    )
  );
create policy "users delete their own messages" on public.assistant_messages
  for delete to authenticated using (user_id = (select auth.uid()));

create policy "users read their own runs" on public.assistant_runs
  for select to authenticated using (user_id = (select auth.uid()));

create policy "users read their own inference events" on public.assistant_inference_events
  for select to authenticated using (user_id = (select auth.uid()));

-------------------------------------------------------------------------------------------------
-- Realtime: clients watch their threads and messages (RLS applies to what they receive).
-- Runs are left out on purpose: every claim and lease renewal would be a change for Realtime to
-- check against every subscriber.
-------------------------------------------------------------------------------------------------
alter publication supabase_realtime add table public.assistant_threads, public.assistant_messages;
