-- Rolls back 20261122000700_usage_windows.sql: usage counted in one row per user, metric and
-- window again (ai_usage_counters becomes a table again, with the counts of ai_usage_windows), and
-- ai_usage_add and admit_request get their bodies of 20261122000200 back.
begin;
-- The view already has the counts in the table's form: keep them while the table is rebuilt.
create temporary table usage_counts on commit drop as
select user_id, metric, time_window, window_start, used, updated_at from public.ai_usage_counters;
drop view public.ai_usage_counters;

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

insert into public.ai_usage_counters (user_id, metric, time_window, window_start, used, updated_at)
select user_id, metric, time_window, window_start, used, updated_at from usage_counts;

drop table public.ai_usage_windows;

revoke all on public.ai_usage_counters from anon, authenticated;
grant select on public.ai_usage_counters to authenticated;
grant all on public.ai_usage_counters to service_role;
alter table public.ai_usage_counters enable row level security;
create policy "users read their own usage" on public.ai_usage_counters
  for select to authenticated using (user_id = (select auth.uid()));

create or replace function public.ai_usage_add(p_user_id uuid, p_deltas jsonb) returns void
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

delete from supabase_migrations.schema_migrations where version = '20261122000700';
commit;
