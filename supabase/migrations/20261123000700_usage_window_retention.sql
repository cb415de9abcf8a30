-- Usage windows are pruned.
--
-- ai_usage_windows gains a row per user for every hour, day, week and month in which the user
-- used the assistant, and nothing deleted them: on a busy project the table grew by an hour row
-- per active user-hour, for ever. Admission reads only the current windows, and the operator
-- reports (ai_usage_daily, _monthly, _today) read the inference events, so old windows serve only
-- the history a user can read of their own usage (ai_usage_counters).
--
-- prune_usage_windows deletes the windows that ended before a retention period: hour windows
-- after p_hours_kept (7 days by default), day, week and month windows after p_others_kept
-- (13 months), at most p_limit rows a call (rows locked by an admission meanwhile are skipped),
-- and answers how many it deleted. The worker calls it every USAGE_PRUNE_INTERVAL_SECONDS (or,
-- with that at 0, schedule it with pg_cron). Service role only.

create index idx_ai_usage_windows_window_start on public.ai_usage_windows (time_window, window_start);

create function public.prune_usage_windows(
  p_hours_kept interval default '7 days',
  p_others_kept interval default '13 months',
  p_limit integer default 10000
) returns integer
language plpgsql
set search_path = ''
as $$
declare
  deleted integer;
begin
  if p_hours_kept is null or p_others_kept is null or p_hours_kept < interval '1 hour'
     or p_others_kept < interval '1 month' then
    raise exception 'retention must be at least an hour for hour windows and a month for the others (got % and %)',
      p_hours_kept, p_others_kept using errcode = '22023';
  end if;
  if p_limit is null or p_limit < 1 or p_limit > 1000000 then
    raise exception 'p_limit must be between 1 and 1000000 (got %)', p_limit using errcode = '22023';
  end if;
  with old as (
    select w.user_id, w.time_window, w.window_start
      from unnest(array['hour', 'day', 'week', 'month']) k(w)
     cross join lateral (
       select w.user_id, w.time_window, w.window_start
         from public.ai_usage_windows w
        where w.time_window = k.w
          and w.window_start < now() - case when k.w = 'hour' then p_hours_kept else p_others_kept end
                                     - ('1 ' || k.w)::interval  -- it ended before the retention
        limit p_limit
          for update skip locked) w
     limit p_limit
  )
  delete from public.ai_usage_windows w
   using old
   where w.user_id = old.user_id and w.time_window = old.time_window and w.window_start = old.window_start;
  get diagnostics deleted = row_count;
  return deleted;
end
$$;

comment on function public.prune_usage_windows(interval, interval, integer) is
  'Deletes usage windows that ended before their retention (hour windows: p_hours_kept, the others: p_others_kept), '
  'at most p_limit a call; answers how many. Called by the worker every USAGE_PRUNE_INTERVAL_SECONDS.';

revoke execute on function public.prune_usage_windows(interval, interval, integer) from public, anon, authenticated;
grant execute on function public.prune_usage_windows(interval, interval, integer) to service_role;
