-- Checks at insert time for two things the claim decided too late (both found by a security
-- review), in one migration because both live in the insert guard of assistant_messages.
--
-- A. A cap on the requests a user can have waiting in the queue. Quotas are admitted when a
--    worker claims a run, so nothing limited what a client could insert: one (anonymous) user
--    could queue twenty thousand messages, and every one of them was claimed, admitted (or
--    refused) and answered before the runs of everyone else behind them. Each plan now caps its
--    users' queued requests (runs not yet taken by a worker, a retry waiting for its turn
--    included); a client's message beyond the cap is refused with SQLSTATE PT429, which
--    PostgREST answers with HTTP 429, and nothing is stored. Null: no cap (plans created before
--    this migration keep their behaviour). Runs being answered do not count: they are no longer
--    ahead of anyone, and counting them would need an index over two statuses, which measured
--    a third slower claim-and-complete cycle (its planning and upkeep on every claim). The check
--    runs after the message's run is queued (an AFTER ROW trigger, after
--    assistant_messages_after_insert: triggers fire in name order) and counts it, so a multi-row
--    insert (PostgREST takes an array) is checked row by row, each row seeing the runs of the
--    rows before it; refusing rolls the whole statement back. Two inserts at once cannot both
--    take the last place: the insert guard takes a transaction-scoped advisory lock per user,
--    before the statement locks any thread row (so two inserts of one user always lock in the
--    same order), and the second insert waits for the first to commit and then counts its run.
--    Messages written by the server (service role, postgres) are not capped.
--
-- B. A withdrawn assistant no longer answers. Deactivating an assistant, or offering it to
--    members only, hid it from the users it was no longer offered to (the assistants' RLS), but
--    threads already with it went on being answered by it. Now
--    1. a client's new message in a thread whose assistant is not offered to it (inactive, or
--       members-only for a guest) is refused at insert, with the reason and what to do (move the
--       thread to another assistant, or start a new one); the check runs with the caller's
--       rights, so the assistants' RLS decides what is offered, exactly as for picking one;
--    2. withdrawing an assistant ends the runs still queued in its threads (all of them when it
--       is deactivated, those of guests when it becomes members-only) as failed, with error_code
--       assistant_unavailable, a reply that says so and a failed event; nothing is sent to the
--       model. Runs in progress finish: they were admitted while the assistant was offered;
--    3. the worker refuses a run whose assistant is inactive (a run that went back to the queue
--       after a failed attempt), with the same code.

alter table public.ai_plans
  add column max_queued_requests integer null,
  add constraint ai_plans_max_queued_requests_positive
    check (max_queued_requests is null or max_queued_requests >= 1);

comment on column public.ai_plans.max_queued_requests is
  'How many of a user''s messages may wait in the queue at once (runs not yet taken by a worker); a client insert beyond it is refused with SQLSTATE PT429 (HTTP 429). Null: no cap.';

update public.ai_plans set max_queued_requests = case id
    when 'guest' then 2
    when 'free' then 4
    when 'premium' then 8
    when 'byok' then 8
  end
 where id in ('guest', 'free', 'premium', 'byok');

-- What the cap counts: small, since runs leave it when a worker takes them.
create index idx_assistant_runs_queued_by_user
  on public.assistant_runs (user_id) where status = 'queued';

-- The insert guard of 20261122000100, plus (for clients) the assistant check (B.1) and the
-- user's queue-cap lock (A), taken last, once the message has passed every rule. One trigger and one
-- look at the thread for all of it: this runs for every message.
create or replace function public.assistant_messages_guard_insert() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  client boolean := public.assistant_is_client();
  thread_owner uuid;
  thread_archived timestamptz;
  assistant_offered boolean;
begin
  -- Runs with the caller's rights: a client sees only its own threads, and only the assistants
  -- offered to it (no assistant means the default one, which is offered to everyone).
  select t.user_id, t.archived_at,
         case when client then t.assistant_id is null
                            or exists (select 1 from public.assistants a where a.id = t.assistant_id) end
    into thread_owner, thread_archived, assistant_offered
    from public.assistant_threads t where t.id = new.thread_id;

  if not client then
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
  if not assistant_offered then
    raise exception 'the assistant of thread % is no longer available to you', new.thread_id
      using errcode = '42501',
            hint = 'move the thread to another assistant (set its assistant_id) or start a new thread';
  end if;
  if new.reply_to is not null or new.token_count is not null or new.model is not null
     or new.latency_ms is not null then
    raise exception 'reply_to, token_count, model and latency_ms are set by the server'
      using errcode = '42501';
  end if;
  -- Clients do not pick their own timestamps: history order is the server's.
  new.created_at := now();
  perform pg_advisory_xact_lock(hashtextextended('assistant_queued_requests:' || new.user_id::text, 0));
  return new;
end
$$;

-- SECURITY DEFINER: counts runs and reads the plan whatever the caller may see. Fired only for
-- client inserts of user messages (the trigger's WHEN runs with the caller's rights), after the
-- row's run is queued, under the lock the guard took.
create function public.assistant_messages_cap_queued_requests() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  cap integer;
  queued integer;
begin
  select p.max_queued_requests into cap
    from public.ai_plans p where p.id = public.ai_plan_of(new.user_id);
  if cap is null then
    return null;
  end if;
  select count(*) into queued  -- this message's run included
    from public.assistant_runs r
   where r.user_id = new.user_id and r.status = 'queued';
  if queued > cap then
    raise exception 'you have % messages waiting in the queue, the most your plan allows at once', queued - 1
      using errcode = 'PT429',
            detail = format('queued requests: %s, limit: %s', queued - 1, cap),
            hint = 'wait for a reply (or cancel a request) before sending another message';
  end if;
  return null;
end
$$;

revoke execute on function public.assistant_messages_cap_queued_requests() from public, anon, authenticated;

-- After assistant_messages_after_insert (name order), which queues the row's run.
create trigger assistant_messages_queue_cap
  after insert on public.assistant_messages
  for each row
  when (new.role = 'user' and public.assistant_is_client())
  execute function public.assistant_messages_cap_queued_requests();

create or replace function public.assistant_failure_text(p_error_code text) returns text
language sql immutable
set search_path = ''
as $$
  select case p_error_code
    when 'assistant_unavailable' then
      'Sorry, this assistant is no longer available. Move the conversation to another assistant or start a new one.'
    else 'Sorry, I could not produce a reply this time: ' || case p_error_code
      when 'rate_limited' then 'the model service is busy.'
      when 'provider_unavailable' then 'the model service is unavailable.'
      when 'timeout' then 'the model took too long to answer.'
      when 'model_failed' then 'the model failed on this request.'
      when 'invalid_output' then 'the model returned an unusable answer.'
      when 'unauthorized' then 'the assistant is not configured correctly.'
      when 'billing_required' then 'the assistant''s model account needs attention.'
      when 'invalid_input' then 'the request could not be sent to the model.'
      when 'lease_expired' then 'the assistant stopped while working on it.'
      when 'model_not_found' then 'the assistant''s model is not available.'
      when 'byok_token_invalid' then 'Replicate refused your API token; update it in your settings.'
      when 'byok_billing_required' then 'your Replicate account needs billing attention.'
      when 'byok_token_missing' then 'your plan uses your own Replicate API token, and none is set.'
      when 'byok_token_unreadable' then 'your stored Replicate token cannot be read; set it again in your settings.'
      else 'an unexpected error occurred.'
    end || ' Please try again.'
  end
$$;

-- SECURITY DEFINER: whoever withdraws the assistant (the service role, an operator in the SQL
-- editor) ends runs and writes replies and events, which only the worker's functions do.
create function public.assistants_after_withdrawal() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  run public.assistant_runs;
begin
  for run in
    select r.* from public.assistant_runs r
      join public.assistant_threads t on t.id = r.thread_id
      join auth.users u on u.id = r.user_id
     where t.assistant_id = new.id and r.status = 'queued'
       and (not new.is_active or (new.offered_to = 'members' and coalesce(u.is_anonymous, false)))
     order by r.id
       for update of r
  loop
    insert into public.assistant_inference_events
      (user_id, thread_id, message_id, run_id, attempt, provider, model, status, error_code)
    values (run.user_id, run.thread_id, run.message_id, run.id, run.attempts + 1, 'replicate', 'not_started',
            'failed', 'assistant_unavailable')
    on conflict (run_id, attempt) where run_id is not null do nothing;
    perform public.assistant_finish_failed(run.id, 'assistant_unavailable',
      format('assistant %s was withdrawn while the request was queued', new.slug));
  end loop;
  return null;
end
$$;

revoke execute on function public.assistants_after_withdrawal() from public, anon, authenticated;

create trigger assistants_after_withdrawal
  after update of is_active, offered_to on public.assistants
  for each row
  when ((old.is_active and not new.is_active) or (old.offered_to = 'everyone' and new.offered_to = 'members'))
  execute function public.assistants_after_withdrawal();
