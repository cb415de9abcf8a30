-- Plans and their limits, users' AI settings, usage counters with atomic admission, bring-your-own
-- Replicate token, usage reports for operators, and feedback on replies.
--
-- One model serves the seeds' five shapes: a limit is a row (plan, metric, window, value); usage
-- is counted per user, metric and window, keyed by the window's start (UTC), so nothing needs
-- resetting: a new window is a new row.

-------------------------------------------------------------------------------------------------
-- Plans
-------------------------------------------------------------------------------------------------
create table public.ai_plans (
  id text primary key,
  name text not null,
  description text not null default '',
  uses_own_key boolean not null default false,
  created_at timestamptz not null default now(),
  constraint ai_plans_id_is_a_slug check (id ~ '^[a-z][a-z0-9_]{0,39}$')
);

comment on column public.ai_plans.uses_own_key is
  'Requests of users on this plan run with their own Replicate token (bring your own key).';

create table public.ai_plan_limits (
  plan_id text not null references public.ai_plans (id) on delete cascade,
  metric text not null,
  time_window text not null,
  limit_value numeric null,
  primary key (plan_id, metric, time_window),
  constraint ai_plan_limits_metric_known
    check (metric in ('messages', 'vision_messages', 'requests', 'tokens', 'cost_usd')),
  constraint ai_plan_limits_window_known check (time_window in ('hour', 'day', 'week', 'month')),
  constraint ai_plan_limits_value_not_negative check (limit_value is null or limit_value >= 0)
);

comment on column public.ai_plan_limits.limit_value is 'Null: unlimited.';

insert into public.ai_plans (id, name, description, uses_own_key) values
  ('guest', 'Guest', 'Anonymous sign-ins: a short taste of the assistant', false),
  ('free', 'Free', '10 messages a day', false),
  ('premium', 'Premium', '100 messages a day', false),
  ('byok', 'Bring your own key', 'Unlimited, on your own Replicate account', true);

insert into public.ai_plan_limits (plan_id, metric, time_window, limit_value) values
  ('guest', 'messages', 'day', 5),
  ('guest', 'vision_messages', 'day', 1),
  ('guest', 'requests', 'hour', 5),
  ('free', 'messages', 'day', 10),
  ('free', 'vision_messages', 'day', 3),
  ('free', 'requests', 'hour', 6),
  ('premium', 'messages', 'day', 100),
  ('premium', 'vision_messages', 'day', 30),
  ('premium', 'requests', 'hour', 60),
  ('premium', 'tokens', 'month', 2000000);

-------------------------------------------------------------------------------------------------
-- Users' AI settings (seed 001 user_ai_settings): the plan (set by the service) and preferences
-- (set by the user).
-------------------------------------------------------------------------------------------------
create table public.user_ai_settings (
  user_id uuid primary key references auth.users (id) on delete cascade,
  plan_id text not null default 'free' references public.ai_plans (id),
  preferred_chat_model text null,
  preferred_vision_model text null,
  preferences jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint user_ai_settings_models_are_slugs
    check ((preferred_chat_model is null or preferred_chat_model ~ '^[\w.-]+/[\w.-]+$')
       and (preferred_vision_model is null or preferred_vision_model ~ '^[\w.-]+/[\w.-]+$')),
  constraint user_ai_settings_preferences_is_object_of_at_most_4kb
    check (jsonb_typeof(preferences) = 'object' and pg_column_size(preferences) <= 4096)
);

create index idx_user_ai_settings_plan on public.user_ai_settings (plan_id);

-- The plan a user starts on: guests (anonymous sign-ins) on guest, everyone else on free.
create function public.ai_default_plan(p_is_anonymous boolean) returns text
language sql immutable
set search_path = ''
as $$
  select case when coalesce(p_is_anonymous, false) then 'guest' else 'free' end
$$;

-- Every user gets settings when Supabase Auth creates them, on their default plan. A guest who
-- links an identity moves to free.
create function public.ai_settings_for_new_user() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into public.user_ai_settings (user_id, plan_id)
  values (new.id, public.ai_default_plan(new.is_anonymous))
  on conflict (user_id) do nothing;
  return null;
end
$$;

create function public.ai_settings_for_converted_guest() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if coalesce(old.is_anonymous, false) and not coalesce(new.is_anonymous, false) then
    update public.user_ai_settings set plan_id = 'free' where user_id = new.id and plan_id = 'guest';
  end if;
  return null;
end
$$;

create trigger on_auth_user_created_ai_settings
  after insert on auth.users
  for each row execute function public.ai_settings_for_new_user();
create trigger on_auth_user_converted_ai_settings
  after update of is_anonymous on auth.users
  for each row execute function public.ai_settings_for_converted_guest();

insert into public.user_ai_settings (user_id, plan_id)
select u.id, public.ai_default_plan(u.is_anonymous) from auth.users u
on conflict (user_id) do nothing;

create function public.user_ai_settings_guard_update() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if public.assistant_is_client() and (
       new.user_id is distinct from old.user_id
    or new.plan_id is distinct from old.plan_id
    or new.created_at is distinct from old.created_at
  ) then
    raise exception 'only your model preferences can be changed'
      using errcode = '42501', hint = 'your plan is managed by the service';
  end if;
  new.updated_at := now();
  return new;
end
$$;

create trigger user_ai_settings_guard_update
  before update on public.user_ai_settings
  for each row execute function public.user_ai_settings_guard_update();

-- The plan a request runs on: the settings row, else the default for the kind of user.
create function public.ai_plan_of(p_user_id uuid) returns text
language sql stable
security definer
set search_path = ''
as $$
  select coalesce(
    (select s.plan_id from public.user_ai_settings s where s.user_id = p_user_id),
    (select public.ai_default_plan(u.is_anonymous) from auth.users u where u.id = p_user_id),
    'free')
$$;

-------------------------------------------------------------------------------------------------
-- Usage counters: one row per user, metric and window, keyed by the window's start (UTC).
-------------------------------------------------------------------------------------------------
create table public.ai_usage_counters (
  user_id uuid not null references auth.users (id) on delete cascade,
  metric text not null,
  time_window text not null,
  window_start timestamptz not null,
  used numeric not null default 0,
  updated_at timestamptz not null default now(),
  primary key (user_id, metric, time_window, window_start),
  constraint ai_usage_counters_metric_known
    check (metric in ('messages', 'vision_messages', 'requests', 'tokens', 'cost_usd')),
  constraint ai_usage_counters_window_known check (time_window in ('hour', 'day', 'week', 'month')),
  constraint ai_usage_counters_used_not_negative check (used >= 0)
);

create index idx_ai_usage_counters_window_start on public.ai_usage_counters (window_start);

create function public.ai_window_start(p_window text, p_at timestamptz default now()) returns timestamptz
language sql immutable
set search_path = ''
as $$
  select date_trunc(p_window, p_at at time zone 'UTC') at time zone 'UTC'
$$;

create function public.ai_window_end(p_window text, p_start timestamptz) returns timestamptz
language sql immutable
set search_path = ''
as $$
  select p_start + ('1 ' || p_window)::interval
$$;

-- Adds to the counters of every window (creating the rows of new windows).
create function public.ai_usage_add(p_user_id uuid, p_deltas jsonb) returns void
language sql
set search_path = ''
as $$
  insert into public.ai_usage_counters as c (user_id, metric, time_window, window_start, used)
  select p_user_id, d.key, w.w, public.ai_window_start(w.w), d.value::numeric
    from jsonb_each_text(p_deltas) d
   cross join unnest(array['hour', 'day', 'week', 'month']) w(w)
   where d.value::numeric > 0
  on conflict (user_id, metric, time_window, window_start)
  do update set used = c.used + excluded.used, updated_at = now()
$$;

-------------------------------------------------------------------------------------------------
-- admit_request: checks every limit of the user's plan and counts the request in every window,
-- atomically. The counter rows of the current windows are locked in one order, so concurrent
-- admissions of one user queue up and no burst gets past a limit. Returns
-- {"admitted": true, "plan": …, "uses_own_key": …} or {"admitted": false, "reason": …, …}.
-- Token and cost limits refuse once they are reached (a reply's size is known only after it).
-------------------------------------------------------------------------------------------------
create function public.admit_request(p_user_id uuid, p_vision boolean default false) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  plan public.ai_plans;
  deltas jsonb := jsonb_build_object('messages', 1, 'vision_messages', case when p_vision then 1 else 0 end,
                                     'requests', 1);
  refusal jsonb;
begin
  select * into plan from public.ai_plans where id = public.ai_plan_of(p_user_id);
  if plan.id is null then
    return jsonb_build_object('admitted', false, 'reason', 'unknown_plan', 'plan', public.ai_plan_of(p_user_id));
  end if;
  if plan.uses_own_key and not exists (select 1 from public.user_replicate_tokens k where k.user_id = p_user_id) then
    return jsonb_build_object('admitted', false, 'reason', 'byok_token_missing', 'plan', plan.id);
  end if;

  insert into public.ai_usage_counters (user_id, metric, time_window, window_start)
  select p_user_id, l.metric, l.time_window, public.ai_window_start(l.time_window)
    from public.ai_plan_limits l where l.plan_id = plan.id and l.limit_value is not null
  on conflict do nothing;

  -- Lock this user's counters of the current windows, always in the same order. Concurrent
  -- admissions wait here; each then reads the counts its predecessor committed.
  perform 1 from public.ai_usage_counters c
    join public.ai_plan_limits l
      on l.plan_id = plan.id and l.metric = c.metric and l.time_window = c.time_window and l.limit_value is not null
   where c.user_id = p_user_id and c.window_start = public.ai_window_start(c.time_window)
   order by c.metric, c.time_window
     for update of c;

  with limits as (
    select l.metric, l.time_window, l.limit_value, public.ai_window_start(l.time_window) as window_start,
           coalesce((deltas ->> l.metric)::numeric, 0) as delta
      from public.ai_plan_limits l
     where l.plan_id = plan.id and l.limit_value is not null
  )
  select jsonb_build_object(
           'admitted', false, 'reason', 'limit_reached', 'plan', plan.id, 'metric', l.metric,
           'window', l.time_window, 'limit', l.limit_value, 'used', k.used,
           'resets_at', public.ai_window_end(l.time_window, l.window_start))
    into refusal
    from limits l join public.ai_usage_counters k using (metric, time_window, window_start)
   where k.user_id = p_user_id
     and ((l.delta > 0 and k.used + l.delta > l.limit_value)
          -- tokens and cost are counted after the reply: refuse once the limit is reached
          or (l.metric in ('tokens', 'cost_usd') and k.used >= l.limit_value))
   -- The limit that lasts longest decides when the user can write again.
   order by public.ai_window_end(l.time_window, l.window_start) desc
   limit 1;

  if refusal is not null then
    return refusal;
  end if;
  perform public.ai_usage_add(p_user_id, deltas);
  return jsonb_build_object('admitted', true, 'plan', plan.id, 'uses_own_key', plan.uses_own_key);
end
$$;

-- What a refused user reads.
create function public.ai_refusal_text(p_refusal jsonb) returns text
language sql immutable
set search_path = ''
as $$
  select case p_refusal ->> 'reason'
    when 'limit_reached' then format(
      'You have reached your limit of %s %s per %s on the %s plan. It resets at %s UTC.',
      trim_scale((p_refusal ->> 'limit')::numeric)::text,
      case p_refusal ->> 'metric'
        when 'messages' then 'message'
        when 'vision_messages' then 'image message'
        when 'requests' then 'request'
        when 'tokens' then 'token'
        when 'cost_usd' then 'US dollar'
      end || case when (p_refusal ->> 'limit')::numeric = 1 then '' else 's' end
        || case when p_refusal ->> 'metric' = 'cost_usd' then ' of model usage' else '' end,
      p_refusal ->> 'window',
      p_refusal ->> 'plan',
      to_char((p_refusal ->> 'resets_at')::timestamptz at time zone 'UTC', 'YYYY-MM-DD HH24:MI'))
    when 'byok_token_missing' then
      'Your plan uses your own Replicate API token, and none is set. Add it in your settings to continue.'
    else 'Your request could not be admitted (' || coalesce(p_refusal ->> 'reason', 'unknown reason') || ').'
  end
$$;

-------------------------------------------------------------------------------------------------
-- Bring your own key: a user's Replicate token, write-only for the user. With Supabase Vault it
-- is stored as a Vault secret; without Vault it waits (readable by no client) until the worker
-- encrypts it with its own key (BYOK_ENCRYPTION_KEY) and then only the ciphertext is kept.
-------------------------------------------------------------------------------------------------
create table public.user_replicate_tokens (
  user_id uuid primary key references auth.users (id) on delete cascade,
  vault_secret_id uuid null,
  pending_token text null,
  ciphertext text null,
  token_hint text not null,
  version integer not null default 1,
  updated_at timestamptz not null default now(),
  constraint user_replicate_tokens_stored_one_way
    check (num_nonnulls(vault_secret_id, pending_token, ciphertext) = 1)
);

comment on table public.user_replicate_tokens is
  'BYOK tokens. No client privilege at all: users set and clear theirs through set_my_replicate_token().';

create function public.set_my_replicate_token(p_token text) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  me uuid := auth.uid();
  existing public.user_replicate_tokens;
  secret_id uuid;
  hint text;
begin
  if me is null then
    raise exception 'sign in to set a Replicate token' using errcode = '42501';
  end if;
  select * into existing from public.user_replicate_tokens where user_id = me for update;

  if p_token is null or btrim(p_token) = '' then
    if existing.vault_secret_id is not null then
      execute 'delete from vault.secrets where id = $1' using existing.vault_secret_id;
    end if;
    delete from public.user_replicate_tokens where user_id = me;
    return jsonb_build_object('token_set', false);
  end if;
  p_token := btrim(p_token);
  if char_length(p_token) not between 20 and 200 or p_token !~ '^[A-Za-z0-9_-]+$' then
    raise exception 'that does not look like a Replicate API token'
      using errcode = '22023', hint = 'Replicate tokens start with r8_ and contain letters, digits, _ and -';
  end if;
  hint := '…' || right(p_token, 4);

  if to_regnamespace('vault') is not null then
    if existing.vault_secret_id is not null then
      execute 'select vault.update_secret($1, $2)' using existing.vault_secret_id, p_token;
      secret_id := existing.vault_secret_id;
    else
      execute 'select vault.create_secret($1, $2, $3)'
        into secret_id using p_token, 'replicate_token_' || me::text, 'BYOK Replicate token';
    end if;
    insert into public.user_replicate_tokens (user_id, vault_secret_id, token_hint)
    values (me, secret_id, hint)
    on conflict (user_id) do update
      set vault_secret_id = excluded.vault_secret_id, pending_token = null, ciphertext = null,
          token_hint = excluded.token_hint, version = public.user_replicate_tokens.version + 1, updated_at = now();
  else
    insert into public.user_replicate_tokens (user_id, pending_token, token_hint)
    values (me, p_token, hint)
    on conflict (user_id) do update
      set vault_secret_id = null, pending_token = excluded.pending_token, ciphertext = null,
          token_hint = excluded.token_hint, version = public.user_replicate_tokens.version + 1, updated_at = now();
  end if;
  return jsonb_build_object('token_set', true, 'token_hint', hint);
end
$$;

-- What a user may know about their token: whether one is set, and its last four characters.
create function public.my_replicate_token_status() returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select coalesce(
    (select jsonb_build_object('token_set', true, 'token_hint', t.token_hint, 'updated_at', t.updated_at)
       from public.user_replicate_tokens t where t.user_id = auth.uid()),
    jsonb_build_object('token_set', false))
$$;

-- For the worker: the token of a BYOK user. {"source": "vault", "token": …} (decrypted by
-- Vault), {"source": "worker", "ciphertext": …, "version": n} (the worker decrypts), or
-- {"source": "pending", "token": …, "version": n} (the worker encrypts it, see below).
create function public.get_replicate_token(p_user_id uuid) returns jsonb
language plpgsql
security definer  -- reads vault.decrypted_secrets, which only the owner may
set search_path = ''
as $$
declare
  t public.user_replicate_tokens;
  plain text;
begin
  select * into t from public.user_replicate_tokens where user_id = p_user_id;
  if not found then
    return null;
  end if;
  if t.vault_secret_id is not null then
    execute 'select decrypted_secret from vault.decrypted_secrets where id = $1' into plain using t.vault_secret_id;
    return jsonb_build_object('source', 'vault', 'token', plain);
  end if;
  if t.ciphertext is not null then
    return jsonb_build_object('source', 'worker', 'ciphertext', t.ciphertext, 'version', t.version);
  end if;
  return jsonb_build_object('source', 'pending', 'token', t.pending_token, 'version', t.version);
end
$$;

-- Replaces a pending token with the worker's ciphertext, unless the user changed it meanwhile.
create function public.store_encrypted_replicate_token(p_user_id uuid, p_version integer, p_ciphertext text)
returns boolean
language sql
set search_path = ''
as $$
  with stored as (
    update public.user_replicate_tokens
       set ciphertext = p_ciphertext, pending_token = null, updated_at = now()
     where user_id = p_user_id and version = p_version and pending_token is not null
    returning true
  )
  select exists (select 1 from stored)
$$;

create function public.pending_replicate_tokens(p_limit integer default 100)
returns table (user_id uuid, version integer, token text)
language sql stable
set search_path = ''
as $$
  select t.user_id, t.version, t.pending_token from public.user_replicate_tokens t
   where t.pending_token is not null order by t.updated_at limit p_limit
$$;

-------------------------------------------------------------------------------------------------
-- Reading one's usage
-------------------------------------------------------------------------------------------------
create function public.my_ai_usage()
returns table (plan_id text, metric text, time_window text, limit_value numeric, used numeric,
               remaining numeric, window_start timestamptz, resets_at timestamptz)
language sql stable
security definer
set search_path = ''
as $$
  with me as (select auth.uid() as id, public.ai_plan_of(auth.uid()) as plan)
  select me.plan, l.metric, l.time_window, l.limit_value, coalesce(c.used, 0),
         case when l.limit_value is null then null else greatest(l.limit_value - coalesce(c.used, 0), 0) end,
         public.ai_window_start(l.time_window), public.ai_window_end(l.time_window, public.ai_window_start(l.time_window))
    from me
    join public.ai_plan_limits l on l.plan_id = me.plan
    left join public.ai_usage_counters c
      on c.user_id = me.id and c.metric = l.metric and c.time_window = l.time_window
     and c.window_start = public.ai_window_start(l.time_window)
   where me.id is not null
   order by l.metric, l.time_window
$$;

-------------------------------------------------------------------------------------------------
-- Operator reports (seed 002): per day and per month, per user and model, from the inference
-- events. Materialized views bypass RLS and PostgREST would serve them to anyone with SELECT,
-- so no client role has any privilege on them. Refreshed by refresh_ai_usage_reports(): the
-- worker calls it every USAGE_REPORT_REFRESH_SECONDS (or schedule it with pg_cron).
-------------------------------------------------------------------------------------------------
create materialized view public.ai_usage_daily as
select (date_trunc('day', e.created_at at time zone 'UTC'))::date as day, e.user_id, e.model,
       count(*) filter (where e.status = 'succeeded') as replies,
       count(*) filter (where e.status = 'failed') as failures,
       count(*) filter (where e.status = 'blocked') as blocked,
       coalesce(sum(e.input_tokens), 0) as input_tokens,
       coalesce(sum(e.output_tokens), 0) as output_tokens,
       coalesce(sum(e.cost_estimate_usd), 0) as cost_usd
  from public.assistant_inference_events e
 group by 1, 2, 3;

create unique index idx_ai_usage_daily_key on public.ai_usage_daily (day, user_id, model);

create materialized view public.ai_usage_monthly as
select (date_trunc('month', d.day))::date as month, d.user_id, d.model,
       sum(d.replies)::bigint as replies, sum(d.failures)::bigint as failures, sum(d.blocked)::bigint as blocked,
       sum(d.input_tokens)::bigint as input_tokens, sum(d.output_tokens)::bigint as output_tokens,
       sum(d.cost_usd) as cost_usd
  from public.ai_usage_daily d
 group by 1, 2, 3;

create unique index idx_ai_usage_monthly_key on public.ai_usage_monthly (month, user_id, model);

-- Today, live (seed 002's current-day view): computed on read from the last day of events.
create view public.ai_usage_today with (security_invoker = true) as
select e.user_id, e.model,
       count(*) filter (where e.status = 'succeeded') as replies,
       count(*) filter (where e.status = 'failed') as failures,
       count(*) filter (where e.status = 'blocked') as blocked,
       coalesce(sum(e.input_tokens), 0) as input_tokens,
       coalesce(sum(e.output_tokens), 0) as output_tokens,
       coalesce(sum(e.cost_estimate_usd), 0) as cost_usd
  from public.assistant_inference_events e
 where e.created_at >= public.ai_window_start('day')
 group by 1, 2;

create function public.refresh_ai_usage_reports() returns void
language plpgsql
set search_path = ''
as $$
begin
  refresh materialized view concurrently public.ai_usage_daily;
  refresh materialized view concurrently public.ai_usage_monthly;
end
$$;

-------------------------------------------------------------------------------------------------
-- Feedback on replies (seeds 002 and 004)
-------------------------------------------------------------------------------------------------
create table public.ai_feedback (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
  message_id uuid not null references public.assistant_messages (id) on delete cascade,
  rating smallint not null,
  comment text null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint ai_feedback_rating_is_plus_or_minus_one check (rating in (-1, 1)),
  constraint ai_feedback_comment_at_most_5000_chars check (comment is null or char_length(comment) <= 5000),
  constraint ai_feedback_one_per_user_and_message unique (user_id, message_id)
);

create index idx_ai_feedback_message on public.ai_feedback (message_id);

create function public.ai_feedback_guard() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if not public.assistant_is_client() then
    if tg_op = 'UPDATE' then
      new.updated_at := now();
    end if;
    return new;
  end if;
  if tg_op = 'INSERT' then
    if new.user_id is distinct from auth.uid() then
      raise exception 'feedback is given in your own name (user_id must be your own user id)' using errcode = '42501';
    end if;
    if not exists (select 1 from public.assistant_messages m
                    where m.id = new.message_id and m.user_id = auth.uid() and m.role = 'assistant') then
      raise exception 'feedback can only be given on an assistant reply in your own threads'
        using errcode = '42501';
    end if;
    new.created_at := now();
    new.updated_at := now();
  else
    if new.user_id is distinct from old.user_id or new.message_id is distinct from old.message_id
       or new.created_at is distinct from old.created_at then
      raise exception 'only the rating and comment of feedback can be changed' using errcode = '42501';
    end if;
    new.updated_at := now();
  end if;
  return new;
end
$$;

create trigger ai_feedback_guard
  before insert or update on public.ai_feedback
  for each row execute function public.ai_feedback_guard();

-- Per reply, for operators (no client privilege).
create view public.ai_feedback_summary with (security_invoker = true) as
select f.message_id, m.model,
       count(*) filter (where f.rating = 1) as thumbs_up,
       count(*) filter (where f.rating = -1) as thumbs_down,
       count(f.comment) as comments,
       max(f.updated_at) as last_feedback_at
  from public.ai_feedback f
  join public.assistant_messages m on m.id = f.message_id
 group by f.message_id, m.model;

-------------------------------------------------------------------------------------------------
-- Privileges and RLS
-------------------------------------------------------------------------------------------------
revoke all on public.ai_plans, public.ai_plan_limits, public.user_ai_settings, public.ai_usage_counters,
              public.user_replicate_tokens, public.ai_feedback,
              public.ai_usage_daily, public.ai_usage_monthly, public.ai_usage_today, public.ai_feedback_summary
  from anon, authenticated;
grant select on public.ai_plans, public.ai_plan_limits to authenticated;
grant select, update on public.user_ai_settings to authenticated;
grant select on public.ai_usage_counters to authenticated;
grant select, insert, update, delete on public.ai_feedback to authenticated;
grant all on public.ai_plans, public.ai_plan_limits, public.user_ai_settings, public.ai_usage_counters,
             public.user_replicate_tokens, public.ai_feedback to service_role;
grant select on public.ai_usage_daily, public.ai_usage_monthly, public.ai_usage_today, public.ai_feedback_summary
  to service_role;

alter table public.ai_plans enable row level security;
alter table public.ai_plan_limits enable row level security;
alter table public.user_ai_settings enable row level security;
alter table public.ai_usage_counters enable row level security;
alter table public.user_replicate_tokens enable row level security;
alter table public.ai_feedback enable row level security;

create policy "signed-in users read the plans" on public.ai_plans
  for select to authenticated using (true);
create policy "signed-in users read the plan limits" on public.ai_plan_limits
  for select to authenticated using (true);
create policy "users read their own ai settings" on public.user_ai_settings
  for select to authenticated using (user_id = (select auth.uid()));
create policy "users change their own preferences" on public.user_ai_settings
  for update to authenticated
  using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));
create policy "users read their own usage" on public.ai_usage_counters
  for select to authenticated using (user_id = (select auth.uid()));
create policy "users read their own feedback" on public.ai_feedback
  for select to authenticated using (user_id = (select auth.uid()));
create policy "users give feedback on replies in their own threads" on public.ai_feedback
  for insert to authenticated with check (
    user_id = (select auth.uid())
    and exists (select 1 from public.assistant_messages m
                 where m.id = message_id and m.user_id = (select auth.uid()) and m.role = 'assistant'));
create policy "users change their own feedback" on public.ai_feedback
  for update to authenticated
  using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));
create policy "users delete their own feedback" on public.ai_feedback
  for delete to authenticated using (user_id = (select auth.uid()));
-- user_replicate_tokens: RLS on and no policy: no client reads or writes a row, ever.

revoke execute on function
  public.ai_default_plan(boolean),
  public.ai_settings_for_new_user(), public.ai_settings_for_converted_guest(), public.ai_plan_of(uuid),
  public.ai_usage_add(uuid, jsonb), public.admit_request(uuid, boolean),
  public.get_replicate_token(uuid), public.store_encrypted_replicate_token(uuid, integer, text),
  public.pending_replicate_tokens(integer), public.refresh_ai_usage_reports()
  from public, anon, authenticated;
revoke execute on function public.set_my_replicate_token(text), public.my_replicate_token_status(),
  public.my_ai_usage() from public, anon;
grant execute on function public.set_my_replicate_token(text), public.my_replicate_token_status(),
  public.my_ai_usage() to authenticated;
grant execute on function
  public.ai_plan_of(uuid), public.ai_usage_add(uuid, jsonb), public.admit_request(uuid, boolean),
  public.get_replicate_token(uuid), public.store_encrypted_replicate_token(uuid, integer, text),
  public.pending_replicate_tokens(integer), public.refresh_ai_usage_reports()
  to service_role;
