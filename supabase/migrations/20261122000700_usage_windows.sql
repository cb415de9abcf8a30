-- Usage counted in one row per user and window, with a column per metric.
--
-- Until now every metric had its own row in every window (hour, day, week, month): a reply cost
-- 16 row writes of counters (messages and requests when admitted, tokens and cost when
-- completed, each in 4 windows). ai_usage_windows keeps the same counts in 4 rows per user and
-- period, so a reply costs 8 row writes.
--
-- ai_usage_counters stays readable as before: it is now a view of the same columns (user_id,
-- metric, time_window, window_start, used, updated_at), one row per metric that has been used in
-- the window (used > 0), under the RLS of the table it reads. It is no longer writable; the
-- service role writes counts with ai_usage_add (or updates ai_usage_windows).

create table public.ai_usage_windows (
  user_id uuid not null references auth.users (id) on delete cascade,
  time_window text not null,
  window_start timestamptz not null,
  messages numeric not null default 0,
  vision_messages numeric not null default 0,
  requests numeric not null default 0,
  tokens numeric not null default 0,
  cost_usd numeric not null default 0,
  updated_at timestamptz not null default now(),
  primary key (user_id, time_window, window_start),
  constraint ai_usage_windows_window_known check (time_window in ('hour', 'day', 'week', 'month')),
  constraint ai_usage_windows_not_negative
    check (messages >= 0 and vision_messages >= 0 and requests >= 0 and tokens >= 0 and cost_usd >= 0)
);

comment on table public.ai_usage_windows is
  'Usage per user and window (hour, day, week, month; keyed by the window''s UTC start), a column per metric. '
  'Written by admit_request and ai_usage_add; read through ai_usage_counters or my_ai_usage().';

insert into public.ai_usage_windows (user_id, time_window, window_start, messages, vision_messages, requests,
                                     tokens, cost_usd, updated_at)
select c.user_id, c.time_window, c.window_start,
       coalesce(sum(c.used) filter (where c.metric = 'messages'), 0),
       coalesce(sum(c.used) filter (where c.metric = 'vision_messages'), 0),
       coalesce(sum(c.used) filter (where c.metric = 'requests'), 0),
       coalesce(sum(c.used) filter (where c.metric = 'tokens'), 0),
       coalesce(sum(c.used) filter (where c.metric = 'cost_usd'), 0),
       max(c.updated_at)
  from public.ai_usage_counters c
 group by c.user_id, c.time_window, c.window_start;

drop table public.ai_usage_counters;

create view public.ai_usage_counters with (security_invoker = true) as
select w.user_id, m.metric, w.time_window, w.window_start, m.used, w.updated_at
  from public.ai_usage_windows w
 cross join lateral (values ('messages', w.messages), ('vision_messages', w.vision_messages),
                            ('requests', w.requests), ('tokens', w.tokens), ('cost_usd', w.cost_usd)) m (metric, used)
 where m.used > 0;

comment on view public.ai_usage_counters is
  'Usage per user, metric and window: one row per metric used in the window (from ai_usage_windows).';

-------------------------------------------------------------------------------------------------
-- ai_usage_add: adds to the counts of every window (creating the rows of new windows), in
-- window order (hour, day, week, month), the order admit_request locks them in. Deltas that are
-- not positive are ignored, as before; an unknown metric is an error.
-------------------------------------------------------------------------------------------------
create or replace function public.ai_usage_add(p_user_id uuid, p_deltas jsonb) returns void
language plpgsql
set search_path = ''
as $$
declare
  d record;
begin
  if jsonb_typeof(p_deltas) is distinct from 'object' then
    raise exception 'usage deltas must be a JSON object (got %)', p_deltas using errcode = '22023';
  end if;
  if exists (select 1 from jsonb_object_keys(p_deltas) k
              where k not in ('messages', 'vision_messages', 'requests', 'tokens', 'cost_usd')) then
    raise exception 'unknown usage metric in % (known: messages, vision_messages, requests, tokens, cost_usd)',
      p_deltas using errcode = '22023';
  end if;
  select greatest(coalesce(x.messages, 0), 0) as messages,
         greatest(coalesce(x.vision_messages, 0), 0) as vision_messages,
         greatest(coalesce(x.requests, 0), 0) as requests,
         greatest(coalesce(x.tokens, 0), 0) as tokens,
         greatest(coalesce(x.cost_usd, 0), 0) as cost_usd
    into d
    from jsonb_to_record(p_deltas) as x (messages numeric, vision_messages numeric, requests numeric,
                                         tokens numeric, cost_usd numeric);
  if d.messages = 0 and d.vision_messages = 0 and d.requests = 0 and d.tokens = 0 and d.cost_usd = 0 then
    return;
  end if;
  insert into public.ai_usage_windows as c (user_id, time_window, window_start, messages, vision_messages,
                                            requests, tokens, cost_usd)
  select p_user_id, w.w, public.ai_window_start(w.w), d.messages, d.vision_messages, d.requests, d.tokens, d.cost_usd
    from unnest(array['hour', 'day', 'week', 'month']) with ordinality w (w, n)
   order by w.n
  on conflict (user_id, time_window, window_start)
  do update set messages = c.messages + excluded.messages,
                vision_messages = c.vision_messages + excluded.vision_messages,
                requests = c.requests + excluded.requests,
                tokens = c.tokens + excluded.tokens,
                cost_usd = c.cost_usd + excluded.cost_usd,
                updated_at = now();
end
$$;

-------------------------------------------------------------------------------------------------
-- admit_request, as in 20261122000200, on ai_usage_windows: when the plan has limits, the user's
-- rows of the current windows are locked in window order (hour, day, week, month) before they
-- are read.
-------------------------------------------------------------------------------------------------
create or replace function public.admit_request(p_user_id uuid, p_vision boolean default false) returns jsonb
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

  if exists (select 1 from public.ai_plan_limits l where l.plan_id = plan.id and l.limit_value is not null) then
    -- This user's rows of the current windows, created if new and locked in window order (the
    -- order ai_usage_add writes them in, so an admission and a completion of one user never wait
    -- for each other in a cycle). Concurrent admissions wait here; each then reads the counts its
    -- predecessor committed.
    insert into public.ai_usage_windows (user_id, time_window, window_start)
    select p_user_id, w.w, public.ai_window_start(w.w)
      from unnest(array['hour', 'day', 'week', 'month']) with ordinality w (w, n)
     order by w.n
    on conflict do nothing;

    perform 1
       from unnest(array['hour', 'day', 'week', 'month']) with ordinality w (w, n)
       join public.ai_usage_windows u
         on u.user_id = p_user_id and u.time_window = w.w and u.window_start = public.ai_window_start(w.w)
      order by w.n
        for update of u;

    with limits as (
      select l.metric, l.time_window, l.limit_value, public.ai_window_start(l.time_window) as window_start,
             coalesce((deltas ->> l.metric)::numeric, 0) as delta
        from public.ai_plan_limits l
       where l.plan_id = plan.id and l.limit_value is not null
    ), usage as (
      select l.*, case l.metric when 'messages' then w.messages when 'vision_messages' then w.vision_messages
                                when 'requests' then w.requests when 'tokens' then w.tokens
                                when 'cost_usd' then w.cost_usd end as used
        from limits l
        join public.ai_usage_windows w
          on w.user_id = p_user_id and w.time_window = l.time_window and w.window_start = l.window_start
    )
    select jsonb_build_object(
             'admitted', false, 'reason', 'limit_reached', 'plan', plan.id, 'metric', u.metric,
             'window', u.time_window, 'limit', u.limit_value, 'used', u.used,
             'resets_at', public.ai_window_end(u.time_window, u.window_start))
      into refusal
      from usage u
     where (u.delta > 0 and u.used + u.delta > u.limit_value)
           -- tokens and cost are counted after the reply: refuse once the limit is reached
           or (u.metric in ('tokens', 'cost_usd') and u.used >= u.limit_value)
     -- The limit that lasts longest decides when the user can write again.
     order by public.ai_window_end(u.time_window, u.window_start) desc
     limit 1;

    if refusal is not null then
      return refusal;
    end if;
  end if;
  perform public.ai_usage_add(p_user_id, deltas);
  return jsonb_build_object('admitted', true, 'plan', plan.id, 'uses_own_key', plan.uses_own_key);
end
$$;

-------------------------------------------------------------------------------------------------
-- Privileges and RLS: users read their own usage (in either form); only the service role writes.
-------------------------------------------------------------------------------------------------
revoke all on public.ai_usage_windows, public.ai_usage_counters from anon, authenticated;
grant select on public.ai_usage_windows, public.ai_usage_counters to authenticated;
grant all on public.ai_usage_windows to service_role;
grant select on public.ai_usage_counters to service_role;

alter table public.ai_usage_windows enable row level security;
create policy "users read their own usage" on public.ai_usage_windows
  for select to authenticated using (user_id = (select auth.uid()));
