-- A cap on the requests a user can have waiting for a reply at once.
--
-- Quotas are admitted when a worker claims a run, so nothing limited what a client could insert:
-- one (anonymous) user could queue twenty thousand messages, and every one of them was claimed,
-- admitted (or refused) and answered before the runs of everyone else behind them. Each plan now
-- caps its users' open requests (runs queued or in progress); a message beyond the cap is refused
-- at insert with SQLSTATE PT429, which PostgREST answers with HTTP 429, and nothing is stored.
-- Null: no cap (plans created before this migration keep their behaviour).
--
-- Two inserts at once cannot both take the last place: the check takes a transaction-scoped
-- advisory lock per user, so the second waits for the first to commit and then counts its run.
-- Messages written by the server (service role, postgres) are not capped.

alter table public.ai_plans
  add column max_open_requests integer null,
  add constraint ai_plans_max_open_requests_positive
    check (max_open_requests is null or max_open_requests >= 1);

comment on column public.ai_plans.max_open_requests is
  'How many of a user''s messages may wait for a reply at once (runs queued or in progress); a client insert beyond it is refused with SQLSTATE PT429 (HTTP 429). Null: no cap.';

update public.ai_plans set max_open_requests = case id
    when 'guest' then 2
    when 'free' then 4
    when 'premium' then 8
    when 'byok' then 8
  end
 where id in ('guest', 'free', 'premium', 'byok');

-- What the check counts: small, since runs leave it when they end.
create index idx_assistant_runs_open_by_user
  on public.assistant_runs (user_id) where status in ('queued', 'in_progress');

-- SECURITY DEFINER: counts runs and reads the plan whatever the caller may see. Fired only for
-- client inserts of user messages (the trigger's WHEN runs with the caller's rights).
create function public.assistant_messages_cap_open_requests() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  cap integer;
  open_requests integer;
begin
  select p.max_open_requests into cap
    from public.ai_plans p where p.id = public.ai_plan_of(new.user_id);
  if cap is null then
    return new;
  end if;
  perform pg_advisory_xact_lock(hashtextextended('assistant_open_requests:' || new.user_id::text, 0));
  select count(*) into open_requests
    from public.assistant_runs r
   where r.user_id = new.user_id and r.status in ('queued', 'in_progress');
  if open_requests >= cap then
    raise exception 'you have % messages waiting for a reply, the most your plan allows at once', open_requests
      using errcode = 'PT429',
            detail = format('open requests: %s, limit: %s', open_requests, cap),
            hint = 'wait for a reply (or cancel a request) before sending another message';
  end if;
  return new;
end
$$;

revoke execute on function public.assistant_messages_cap_open_requests() from public, anon, authenticated;

-- Fires after assistant_messages_guard_insert (triggers fire in name order), so a message the
-- guard refuses is refused for that reason first.
create trigger assistant_messages_open_requests
  before insert on public.assistant_messages
  for each row
  when (new.role = 'user' and public.assistant_is_client())
  execute function public.assistant_messages_cap_open_requests();
