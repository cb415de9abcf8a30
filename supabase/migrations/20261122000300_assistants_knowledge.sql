-- Assistants and their starter prompts, users' AI profiles, the knowledge base (pgvector),
-- attachments in Supabase Storage, follow-up suggestions and action requests.

create extension if not exists vector with schema extensions;

-------------------------------------------------------------------------------------------------
-- Assistants (seed 002 tenants' LLM settings, seed 003 assistants)
-------------------------------------------------------------------------------------------------
create table public.assistants (
  id uuid primary key default gen_random_uuid(),
  slug text not null unique,
  name text not null,
  description text not null default '',
  instructions text not null default 'You are a helpful, concise assistant.',
  chat_model text null,
  vision_model text null,
  temperature numeric(3, 2) null,
  max_output_tokens integer null,
  context_token_budget integer null,
  features text[] not null default '{}',
  offered_to text not null default 'everyone',
  is_default boolean not null default false,
  is_active boolean not null default true,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint assistants_slug_format check (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
  constraint assistants_name_between_1_and_120_chars check (char_length(name) between 1 and 120),
  constraint assistants_instructions_at_most_20000_chars check (char_length(instructions) <= 20000),
  constraint assistants_models_are_slugs
    check ((chat_model is null or chat_model ~ '^[\w.-]+/[\w.-]+$')
       and (vision_model is null or vision_model ~ '^[\w.-]+/[\w.-]+$')),
  constraint assistants_temperature_between_0_and_2 check (temperature is null or temperature between 0 and 2),
  constraint assistants_max_output_tokens_between_1_and_8192
    check (max_output_tokens is null or max_output_tokens between 1 and 8192),
  constraint assistants_context_token_budget_at_least_256
    check (context_token_budget is null or context_token_budget >= 256),
  constraint assistants_features_known
    check (features <@ array['knowledge_base', 'follow_ups', 'actions', 'personalisation']::text[]),
  constraint assistants_offered_to_known check (offered_to in ('everyone', 'members'))
);

comment on column public.assistants.offered_to is
  'everyone: every signed-in user, guests included; members: signed-up users only (not anonymous sign-ins).';
comment on column public.assistants.chat_model is 'Null: the worker''s CHAT_MODEL.';

create unique index idx_assistants_one_default on public.assistants (is_default) where is_default;

create trigger assistants_touch_updated_at
  before update on public.assistants
  for each row execute function public.assistant_touch_updated_at();

insert into public.assistants (slug, name, description, features, is_default)
values ('default', 'Assistant', 'A helpful, concise assistant', array['follow_ups', 'personalisation'], true);

create function public.default_assistant_id() returns uuid
language sql stable
security definer
set search_path = ''
as $$
  select id from public.assistants where is_default
$$;

create function public.assistant_id_by_slug(p_slug text) returns uuid
language sql stable
set search_path = ''
as $$
  select id from public.assistants where slug = p_slug
$$;

-- Guided questions (seed 003): starter prompts per assistant, by priority.
create table public.assistant_guided_questions (
  id uuid primary key default gen_random_uuid(),
  assistant_id uuid not null references public.assistants (id) on delete cascade,
  question text not null,
  category text null,
  priority integer not null default 0,
  is_active boolean not null default true,
  created_at timestamptz not null default now(),
  constraint assistant_guided_questions_question_between_1_and_300_chars
    check (char_length(question) between 1 and 300)
);

create index idx_assistant_guided_questions_assistant
  on public.assistant_guided_questions (assistant_id, priority desc) where is_active;

-- A thread belongs to one assistant (the default one unless the app picks another).
alter table public.assistant_threads
  add column assistant_id uuid null default public.default_assistant_id()
    references public.assistants (id) on delete set null;
create index idx_assistant_threads_assistant on public.assistant_threads (assistant_id);

-- image_url is an https URL or an object in Supabase Storage: storage://<bucket>/<path>.
alter table public.assistant_messages
  add constraint assistant_messages_image_url_is_https_or_storage
  check (image_url is null or image_url ~ '^(https://|storage://)');

-------------------------------------------------------------------------------------------------
-- AI profiles (seed 004 ai_profile): what the assistant may know about the user.
-------------------------------------------------------------------------------------------------
create table public.ai_profiles (
  user_id uuid primary key default auth.uid() references auth.users (id) on delete cascade,
  goals jsonb not null default '[]'::jsonb,
  experience_level text null,
  preferences jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint ai_profiles_goals_is_array_of_at_most_20 check (
    jsonb_typeof(goals) = 'array' and jsonb_array_length(goals) <= 20),
  constraint ai_profiles_experience_level_at_most_200_chars
    check (experience_level is null or char_length(experience_level) <= 200),
  constraint ai_profiles_preferences_is_object check (jsonb_typeof(preferences) = 'object'),
  constraint ai_profiles_at_most_4kb check (pg_column_size(goals) + pg_column_size(preferences) <= 4096)
);

create trigger ai_profiles_touch_updated_at
  before update on public.ai_profiles
  for each row execute function public.assistant_touch_updated_at();

-------------------------------------------------------------------------------------------------
-- Knowledge base (seed 004 ai_kb_docs, seed 001 phase 3): documents, chunks with embeddings
-- (768 dimensions: the default embedding model's; another model needs a migration), an HNSW
-- index for cosine distance, and a log of retrievals (seed 001 ai_content_searches).
-- Service role only.
-------------------------------------------------------------------------------------------------
create table public.kb_documents (
  id uuid primary key default gen_random_uuid(),
  assistant_id uuid null references public.assistants (id) on delete cascade,
  source text not null,
  title text not null,
  content_hash text not null,
  metadata jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint kb_documents_source_between_1_and_1000_chars check (char_length(source) between 1 and 1000)
);

comment on column public.kb_documents.assistant_id is 'Null: knowledge for every assistant.';

create unique index idx_kb_documents_source
  on public.kb_documents (source, coalesce(assistant_id, '00000000-0000-0000-0000-000000000000'::uuid));

create table public.kb_chunks (
  id uuid primary key default gen_random_uuid(),
  document_id uuid not null references public.kb_documents (id) on delete cascade,
  chunk_index integer not null,
  content text not null,
  embedding extensions.vector(768) not null,
  metadata jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  constraint kb_chunks_one_per_position unique (document_id, chunk_index),
  constraint kb_chunks_content_between_1_and_8000_chars check (char_length(content) between 1 and 8000)
);

create index idx_kb_chunks_embedding on public.kb_chunks
  using hnsw (embedding extensions.vector_cosine_ops);

create table public.kb_searches (
  id uuid primary key default gen_random_uuid(),
  user_id uuid null references auth.users (id) on delete set null,
  assistant_id uuid null references public.assistants (id) on delete set null,
  run_id uuid null references public.assistant_runs (id) on delete set null,
  query text not null,
  result_count integer not null,
  top_similarity double precision null,
  created_at timestamptz not null default now()
);

create index idx_kb_searches_created_at on public.kb_searches (created_at desc);
create index idx_kb_searches_assistant on public.kb_searches (assistant_id, created_at desc);

-- The nearest chunks to a query embedding, above a cosine similarity threshold, from documents
-- of the given assistant or of every assistant.
create function public.match_kb_chunks(
  p_query_embedding extensions.vector(768),
  p_match_threshold double precision default 0.5,
  p_match_count integer default 5,
  p_assistant_id uuid default null
)
returns table (id uuid, document_id uuid, source text, title text, chunk_index integer, content text,
               similarity double precision)
language sql stable
set search_path = ''
as $$
  select c.id, c.document_id, d.source, d.title, c.chunk_index, c.content,
         1 - (c.embedding operator(extensions.<=>) p_query_embedding) as similarity
    from public.kb_chunks c
    join public.kb_documents d on d.id = c.document_id
   where (d.assistant_id is null or d.assistant_id = p_assistant_id)
     and 1 - (c.embedding operator(extensions.<=>) p_query_embedding) > p_match_threshold
   order by c.embedding operator(extensions.<=>) p_query_embedding
   limit least(greatest(p_match_count, 1), 50)
$$;

-- What the worker calls: match_kb_chunks and a line in kb_searches, in one round trip.
create function public.search_knowledge(
  p_query text,
  p_query_embedding extensions.vector(768),
  p_assistant_id uuid default null,
  p_user_id uuid default null,
  p_run_id uuid default null,
  p_match_threshold double precision default 0.5,
  p_match_count integer default 5
)
returns table (id uuid, document_id uuid, source text, title text, chunk_index integer, content text,
               similarity double precision)
language sql
set search_path = ''
as $$
  with matches as (
    select * from public.match_kb_chunks(p_query_embedding, p_match_threshold, p_match_count, p_assistant_id)
  ), logged as (
    insert into public.kb_searches (user_id, assistant_id, run_id, query, result_count, top_similarity)
    select p_user_id, p_assistant_id, p_run_id, left(p_query, 1000), count(*), max(m.similarity) from matches m
  )
  select * from matches m order by m.similarity desc
$$;

-- Replaces a document's chunks (ingest): unchanged documents (same hash) are left alone.
-- Returns 'unchanged', 'created' or 'updated'.
create function public.kb_upsert_document(
  p_source text,
  p_title text,
  p_content_hash text,
  p_chunks jsonb,
  p_assistant_id uuid default null,
  p_metadata jsonb default '{}'::jsonb
) returns text
language plpgsql
set search_path = ''
as $$
declare
  doc public.kb_documents;
  existed boolean;
begin
  select * into doc from public.kb_documents
   where source = p_source and assistant_id is not distinct from p_assistant_id
   for update;
  existed := found;
  if existed and doc.content_hash = p_content_hash then
    return 'unchanged';
  end if;
  if jsonb_typeof(p_chunks) <> 'array' or jsonb_array_length(p_chunks) = 0 then
    raise exception 'a document needs at least one chunk' using errcode = '22023';
  end if;
  if existed then
    delete from public.kb_chunks where document_id = doc.id;
    update public.kb_documents set title = p_title, content_hash = p_content_hash, metadata = p_metadata,
                                   updated_at = now()
     where id = doc.id;
  else
    insert into public.kb_documents (assistant_id, source, title, content_hash, metadata)
    values (p_assistant_id, p_source, p_title, p_content_hash, p_metadata)
    returning * into doc;
  end if;
  insert into public.kb_chunks (document_id, chunk_index, content, embedding, metadata)
  select doc.id, (c.ordinality - 1)::integer, c.value ->> 'content', (c.value ->> 'embedding')::extensions.vector,
         coalesce(c.value -> 'metadata', '{}'::jsonb)
    from jsonb_array_elements(p_chunks) with ordinality c;
  return case when existed then 'updated' else 'created' end;
end
$$;

create function public.kb_document_hashes(p_assistant_id uuid default null)
returns table (source text, content_hash text)
language sql stable
set search_path = ''
as $$
  select d.source, d.content_hash from public.kb_documents d where d.assistant_id is not distinct from p_assistant_id
$$;

-------------------------------------------------------------------------------------------------
-- Attachments (seed 003 files): images in a private Storage bucket, one folder per user.
-------------------------------------------------------------------------------------------------
insert into storage.buckets (id, name, public, file_size_limit, allowed_mime_types)
values ('chat-attachments', 'chat-attachments', false, 10485760,
        array['image/png', 'image/jpeg', 'image/webp', 'image/gif'])
on conflict (id) do nothing;

create policy "users read their own attachments" on storage.objects
  for select to authenticated
  using (bucket_id = 'chat-attachments' and (storage.foldername(name))[1] = (select auth.uid())::text);
create policy "users upload attachments into their own folder" on storage.objects
  for insert to authenticated
  with check (bucket_id = 'chat-attachments' and (storage.foldername(name))[1] = (select auth.uid())::text);
create policy "users replace their own attachments" on storage.objects
  for update to authenticated
  using (bucket_id = 'chat-attachments' and (storage.foldername(name))[1] = (select auth.uid())::text)
  with check (bucket_id = 'chat-attachments' and (storage.foldername(name))[1] = (select auth.uid())::text);
create policy "users delete their own attachments" on storage.objects
  for delete to authenticated
  using (bucket_id = 'chat-attachments' and (storage.foldername(name))[1] = (select auth.uid())::text);

-- For the worker: an attachment's storage metadata (size, mimetype), or null.
create function public.attachment_object(p_bucket text, p_path text) returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select jsonb_build_object('name', o.name, 'metadata', o.metadata, 'created_at', o.created_at)
    from storage.objects o where o.bucket_id = p_bucket and o.name = p_path
$$;

create table public.assistant_files (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
  thread_id uuid not null references public.assistant_threads (id) on delete cascade,
  message_id uuid null references public.assistant_messages (id) on delete cascade,
  bucket_id text not null default 'chat-attachments',
  storage_path text not null,
  filename text not null,
  mime_type text not null,
  size_bytes bigint not null,
  metadata jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  constraint assistant_files_in_the_attachments_bucket check (bucket_id = 'chat-attachments'),
  constraint assistant_files_path_in_own_folder check (split_part(storage_path, '/', 1) = user_id::text),
  constraint assistant_files_filename_between_1_and_255_chars check (char_length(filename) between 1 and 255),
  constraint assistant_files_is_an_image check (mime_type in ('image/png', 'image/jpeg', 'image/webp', 'image/gif')),
  constraint assistant_files_size_between_1_byte_and_10_mb check (size_bytes between 1 and 10485760),
  constraint assistant_files_one_row_per_object unique (bucket_id, storage_path)
);

create index idx_assistant_files_user on public.assistant_files (user_id, created_at desc);
create index idx_assistant_files_thread on public.assistant_files (thread_id);
create index idx_assistant_files_message on public.assistant_files (message_id);

-------------------------------------------------------------------------------------------------
-- Follow-up suggestions (seed 003): up to three per reply, written by the worker.
-------------------------------------------------------------------------------------------------
create table public.assistant_follow_ups (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  thread_id uuid not null references public.assistant_threads (id) on delete cascade,
  message_id uuid not null references public.assistant_messages (id) on delete cascade,
  position smallint not null,
  suggestion text not null,
  used_at timestamptz null,
  created_at timestamptz not null default now(),
  constraint assistant_follow_ups_position_1_to_3 check (position between 1 and 3),
  constraint assistant_follow_ups_suggestion_between_1_and_300_chars check (char_length(suggestion) between 1 and 300),
  constraint assistant_follow_ups_one_per_position unique (message_id, position)
);

create index idx_assistant_follow_ups_user on public.assistant_follow_ups (user_id, created_at desc);
create index idx_assistant_follow_ups_thread on public.assistant_follow_ups (thread_id, created_at desc);

create function public.assistant_follow_ups_guard_update() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if public.assistant_is_client() then
    if (to_jsonb(new) - 'used_at') is distinct from (to_jsonb(old) - 'used_at') then
      raise exception 'a follow-up suggestion can only be marked used' using errcode = '42501';
    end if;
    -- The server's clock says when; a suggestion stays used once it is.
    new.used_at := case when new.used_at is null then old.used_at else coalesce(old.used_at, now()) end;
  end if;
  return new;
end
$$;

create trigger assistant_follow_ups_guard_update
  before update on public.assistant_follow_ups
  for each row execute function public.assistant_follow_ups_guard_update();

-------------------------------------------------------------------------------------------------
-- Action requests (seed 004 ai_action_requests): the model proposes, the user decides, the
-- worker executes through a handler registered in Python.
-------------------------------------------------------------------------------------------------
create table public.assistant_action_types (
  name text primary key,
  description text not null default '',
  payload_schema jsonb not null default '{}'::jsonb,
  updated_at timestamptz not null default now(),
  constraint assistant_action_types_name_format check (name ~ '^[a-z][a-z0-9_]{0,63}$')
);

create table public.assistant_action_requests (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  thread_id uuid not null references public.assistant_threads (id) on delete cascade,
  message_id uuid null references public.assistant_messages (id) on delete set null,
  action_type text not null references public.assistant_action_types (name),
  payload jsonb not null default '{}'::jsonb,
  status text not null default 'pending',
  error_message text null,
  result jsonb null,
  decided_at timestamptz null,
  executed_at timestamptz null,
  attempts integer not null default 0,
  lease_owner text null,
  lease_expires_at timestamptz null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint assistant_action_requests_status_known
    check (status in ('pending', 'approved', 'rejected', 'executed', 'failed')),
  constraint assistant_action_requests_payload_is_object_of_at_most_16kb
    check (jsonb_typeof(payload) = 'object' and pg_column_size(payload) <= 16384),
  constraint assistant_action_requests_error_at_most_2000_chars
    check (error_message is null or char_length(error_message) <= 2000)
);

create index idx_assistant_action_requests_user_status on public.assistant_action_requests (user_id, status);
create index idx_assistant_action_requests_thread on public.assistant_action_requests (thread_id);
create index idx_assistant_action_requests_approved
  on public.assistant_action_requests (decided_at) where status = 'approved';

-- Users decide on their pending requests: status from pending to approved or rejected, nothing
-- else. An approval wakes the workers (NOTIFY assistant_actions).
create function public.assistant_action_requests_guard_update() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if public.assistant_is_client() then
    if (to_jsonb(new) - 'status') is distinct from (to_jsonb(old) - 'status') then
      raise exception 'only the status of an action request can be changed' using errcode = '42501';
    end if;
    if old.status <> 'pending' then
      raise exception 'this action request was already %', old.status using errcode = '42501';
    end if;
    if new.status not in ('approved', 'rejected') then
      raise exception 'an action request can be approved or rejected (got %)', new.status using errcode = '42501';
    end if;
    new.decided_at := now();
  end if;
  new.updated_at := now();
  if new.status = 'approved' and old.status is distinct from 'approved' then
    perform pg_notify('assistant_actions', new.id::text);
  end if;
  return new;
end
$$;

create trigger assistant_action_requests_guard_update
  before update on public.assistant_action_requests
  for each row execute function public.assistant_action_requests_guard_update();

-- The worker's side: claim approved requests (SKIP LOCKED, lease), then finish them.
create function public.claim_action_requests(p_worker text, p_limit integer default 10, p_lease_seconds integer default 60)
returns setof public.assistant_action_requests
language sql
set search_path = ''
as $$
  with due as (
    select a.id from public.assistant_action_requests a
     where a.status = 'approved' and (a.lease_expires_at is null or a.lease_expires_at <= now())
     order by a.decided_at
     limit least(greatest(p_limit, 1), 100)
     for update skip locked
  )
  update public.assistant_action_requests a
     set lease_owner = p_worker, lease_expires_at = now() + make_interval(secs => p_lease_seconds),
         attempts = a.attempts + 1
    from due where a.id = due.id
  returning a.*
$$;

-- Records the outcome and a `tool` message with the result in the thread, once.
create function public.finish_action_request(p_id uuid, p_succeeded boolean, p_result jsonb default null,
                                             p_error text default null) returns text
language plpgsql
set search_path = ''
as $$
declare
  req public.assistant_action_requests;
  summary text;
begin
  select * into req from public.assistant_action_requests where id = p_id for update;
  if not found then
    raise exception 'action request % not found', p_id using errcode = 'P0002';
  end if;
  if req.status <> 'approved' then
    return req.status;
  end if;
  update public.assistant_action_requests
     set status = case when p_succeeded then 'executed' else 'failed' end,
         result = p_result, error_message = left(p_error, 2000), executed_at = now(),
         lease_owner = null, lease_expires_at = null
   where id = p_id;
  summary := case when p_succeeded
    then format('Action %s executed: %s', req.action_type, left(coalesce(p_result::text, '{}'), 7000))
    else format('Action %s failed: %s', req.action_type, left(coalesce(p_error, 'unknown error'), 7000)) end;
  insert into public.assistant_messages (thread_id, user_id, role, content, metadata_json)
  values (req.thread_id, req.user_id, 'tool', summary,
          jsonb_build_object('action_request_id', req.id, 'action_type', req.action_type,
                             'succeeded', p_succeeded));
  return case when p_succeeded then 'executed' else 'failed' end;
end
$$;

create function public.register_action_types(p_types jsonb) returns void
language sql
set search_path = ''
as $$
  insert into public.assistant_action_types (name, description, payload_schema)
  select t ->> 'name', coalesce(t ->> 'description', ''), coalesce(t -> 'payload_schema', '{}'::jsonb)
    from jsonb_array_elements(p_types) t
  on conflict (name) do update
    set description = excluded.description, payload_schema = excluded.payload_schema, updated_at = now()
$$;

-- A built-in action: the model proposes, the user approves, the profile's preferences change.
create function public.apply_profile_preferences(p_user_id uuid, p_preferences jsonb) returns jsonb
language sql
set search_path = ''
as $$
  insert into public.ai_profiles as p (user_id, preferences) values (p_user_id, p_preferences)
  on conflict (user_id) do update set preferences = p.preferences || excluded.preferences
  returning preferences
$$;

-------------------------------------------------------------------------------------------------
-- Privileges and RLS
-------------------------------------------------------------------------------------------------
revoke all on public.assistants, public.assistant_guided_questions, public.ai_profiles, public.kb_documents,
              public.kb_chunks, public.kb_searches, public.assistant_files, public.assistant_follow_ups,
              public.assistant_action_types, public.assistant_action_requests
  from anon, authenticated;
grant select on public.assistants, public.assistant_guided_questions, public.assistant_action_types to authenticated;
grant select, insert, update, delete on public.ai_profiles to authenticated;
grant select, insert, delete on public.assistant_files to authenticated;
grant select, update on public.assistant_follow_ups, public.assistant_action_requests to authenticated;
grant all on public.assistants, public.assistant_guided_questions, public.ai_profiles, public.kb_documents,
             public.kb_chunks, public.kb_searches, public.assistant_files, public.assistant_follow_ups,
             public.assistant_action_types, public.assistant_action_requests
  to service_role;

alter table public.assistants enable row level security;
alter table public.assistant_guided_questions enable row level security;
alter table public.ai_profiles enable row level security;
alter table public.kb_documents enable row level security;
alter table public.kb_chunks enable row level security;
alter table public.kb_searches enable row level security;
alter table public.assistant_files enable row level security;
alter table public.assistant_follow_ups enable row level security;
alter table public.assistant_action_types enable row level security;
alter table public.assistant_action_requests enable row level security;

create policy "signed-in users read the assistants offered to them" on public.assistants
  for select to authenticated
  using (is_active and (offered_to = 'everyone'
                        or coalesce(((select auth.jwt()) ->> 'is_anonymous')::boolean, false) = false));
create policy "signed-in users read the guided questions of their assistants" on public.assistant_guided_questions
  for select to authenticated
  using (is_active and exists (select 1 from public.assistants a where a.id = assistant_id));
create policy "signed-in users read the action types" on public.assistant_action_types
  for select to authenticated using (true);

create policy "users read their own profile" on public.ai_profiles
  for select to authenticated using (user_id = (select auth.uid()));
create policy "users create their own profile" on public.ai_profiles
  for insert to authenticated with check (user_id = (select auth.uid()));
create policy "users edit their own profile" on public.ai_profiles
  for update to authenticated using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));
create policy "users delete their own profile" on public.ai_profiles
  for delete to authenticated using (user_id = (select auth.uid()));

create policy "users read their own files" on public.assistant_files
  for select to authenticated using (user_id = (select auth.uid()));
create policy "users attach files in their own threads" on public.assistant_files
  for insert to authenticated with check (
    user_id = (select auth.uid())
    and exists (select 1 from public.assistant_threads t where t.id = thread_id and t.user_id = (select auth.uid()))
    and (message_id is null or exists (select 1 from public.assistant_messages m
                                        where m.id = message_id and m.user_id = (select auth.uid()))));
create policy "users delete their own files" on public.assistant_files
  for delete to authenticated using (user_id = (select auth.uid()));

create policy "users read their own follow-ups" on public.assistant_follow_ups
  for select to authenticated using (user_id = (select auth.uid()));
create policy "users mark their own follow-ups used" on public.assistant_follow_ups
  for update to authenticated using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));

create policy "users read their own action requests" on public.assistant_action_requests
  for select to authenticated using (user_id = (select auth.uid()));
create policy "users decide on their own action requests" on public.assistant_action_requests
  for update to authenticated using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));

-- Threads may only be created with an assistant the user is offered.
drop policy "users create threads for themselves" on public.assistant_threads;
create policy "users create threads for themselves" on public.assistant_threads
  for insert to authenticated with check (
    user_id = (select auth.uid())
    and (assistant_id is null or exists (select 1 from public.assistants a where a.id = assistant_id)));

revoke execute on function
  public.assistant_id_by_slug(text),
  public.attachment_object(text, text),
  public.match_kb_chunks(extensions.vector, double precision, integer, uuid),
  public.search_knowledge(text, extensions.vector, uuid, uuid, uuid, double precision, integer),
  public.kb_upsert_document(text, text, text, jsonb, uuid, jsonb),
  public.kb_document_hashes(uuid),
  public.claim_action_requests(text, integer, integer),
  public.finish_action_request(uuid, boolean, jsonb, text),
  public.register_action_types(jsonb),
  public.apply_profile_preferences(uuid, jsonb)
  from public, anon, authenticated;
grant execute on function
  public.assistant_id_by_slug(text),
  public.attachment_object(text, text),
  public.match_kb_chunks(extensions.vector, double precision, integer, uuid),
  public.search_knowledge(text, extensions.vector, uuid, uuid, uuid, double precision, integer),
  public.kb_upsert_document(text, text, text, jsonb, uuid, jsonb),
  public.kb_document_hashes(uuid),
  public.claim_action_requests(text, integer, integer),
  public.finish_action_request(uuid, boolean, jsonb, text),
  public.register_action_types(jsonb),
  public.apply_profile_preferences(uuid, jsonb)
  to service_role;

alter publication supabase_realtime add table public.assistant_follow_ups, public.assistant_action_requests;
