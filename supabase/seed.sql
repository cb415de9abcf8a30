-- Demo data for a local database: `supabase db reset` and `python -m worker db up|reset` apply it
-- after the migrations; `supabase db push` never does. It refuses to run anywhere that does not
-- look local: a server reached over SSL, or at an address outside loopback and private ranges.

create or replace function pg_temp.is_local_database(p_address inet, p_ssl text) returns boolean
language sql immutable
as $$
  select coalesce(p_ssl, 'off') <> 'on'
     and (p_address is null  -- a Unix socket
          or p_address << inet '127.0.0.0/8' or p_address = inet '::1'
          or p_address << inet '10.0.0.0/8' or p_address << inet '172.16.0.0/12'
          or p_address << inet '192.168.0.0/16' or p_address << inet 'fc00::/7')
$$;

do $$
begin
  if not pg_temp.is_local_database(inet_server_addr(), current_setting('ssl', true)) then
    raise exception 'supabase/seed.sql holds demo data for local databases only; refusing to run on %',
      coalesce(host(inet_server_addr()), 'this server');
  end if;
end
$$;

-- Users, as Supabase Auth would create them (their AI settings follow from the sign-up trigger).
insert into auth.users (id, aud, role, email, is_anonymous, created_at) values
  ('a11ce000-0000-4000-8000-000000000001', 'authenticated', 'authenticated', 'alice@example.com', false, now() - interval '40 days'),
  ('b0b00000-0000-4000-8000-000000000002', 'authenticated', 'authenticated', 'bob@example.com', false, now() - interval '20 days'),
  ('9e570000-0000-4000-8000-000000000003', 'authenticated', 'authenticated', null, true, now() - interval '1 day'),
  ('de300000-0000-4000-8000-000000000004', 'authenticated', 'authenticated', 'demo@example.com', false, now())
on conflict (id) do nothing;

update public.user_ai_settings set plan_id = 'premium', preferred_chat_model = 'meta/meta-llama-3-8b-instruct'
 where user_id = 'b0b00000-0000-4000-8000-000000000002';

insert into public.ai_profiles (user_id, goals, experience_level, preferences) values
  ('a11ce000-0000-4000-8000-000000000001', '["build a capsule wardrobe", "dress for a new job"]', 'beginner',
   '{"style": "minimal", "budget": "mid-range", "units": "metric"}')
on conflict (user_id) do nothing;

-- Assistants and their starter prompts.
insert into public.assistants (id, slug, name, description, instructions, features, temperature, max_output_tokens) values
  ('00000000-5717-4000-8000-00000000000a', 'stylist', 'Stylist',
   'Outfit ideas from what you own', 'You are a friendly personal stylist. Keep answers short and practical.',
   array['follow_ups', 'personalisation', 'actions'], 0.7, 400),
  ('00000000-4e1d-4000-8000-00000000000b', 'helpdesk', 'Helpdesk',
   'Answers from the help centre', 'You answer questions about the app from the help centre articles.',
   array['knowledge_base', 'follow_ups'], 0.2, 300)
on conflict (slug) do nothing;

insert into public.assistant_guided_questions (assistant_id, question, category, priority) values
  ('00000000-5717-4000-8000-00000000000a', 'What should I wear to a job interview?', 'work', 10),
  ('00000000-5717-4000-8000-00000000000a', 'Which colours go with navy?', 'colour', 8),
  ('00000000-5717-4000-8000-00000000000a', 'Help me pack for a weekend away', 'travel', 5),
  ('00000000-4e1d-4000-8000-00000000000b', 'How do I reset my password?', 'account', 10),
  ('00000000-4e1d-4000-8000-00000000000b', 'When are invoices sent?', 'billing', 5);

-- A conversation of Alice's over the last days, answered and accounted for: replies, inference
-- events with tokens and cost, feedback. (Runs are marked completed so no worker answers again.)
do $$
declare
  alice uuid := 'a11ce000-0000-4000-8000-000000000001';
  bob uuid := 'b0b00000-0000-4000-8000-000000000002';
  stylist uuid := '00000000-5717-4000-8000-00000000000a';
  thread uuid;
  question uuid;
  answer uuid;
  turn record;
begin
  insert into public.assistant_threads (user_id, title, assistant_id, created_at)
  values (alice, 'Capsule wardrobe', stylist, now() - interval '3 days') returning id into thread;
  for turn in
    select * from (values
      (1, 'I start a new office job next week. What are the basics I need?',
       'Start with two pairs of tailored trousers (navy and grey), three plain shirts, one knit, a blazer and'
       ' leather loafers. Everything mixes, so that is a dozen outfits.', 41, 58, 0.000017, interval '3 days'),
      (2, 'Which colours go with navy?',
       'White, camel, grey and burgundy all work with navy; pale pink softens it for summer.', 37, 29, 0.000009,
       interval '2 days'),
      (3, 'Do I need a black blazer too?',
       'Not yet: a navy blazer covers the same occasions and suits your minimal style better.', 35, 24, 0.000008,
       interval '1 hour')
    ) t(n, q, a, input_tokens, output_tokens, cost, ago)
  loop
    insert into public.assistant_messages (thread_id, user_id, role, content, created_at)
    values (thread, alice, 'user', turn.q, now() - turn.ago) returning id into question;
    insert into public.assistant_messages (thread_id, user_id, role, content, reply_to, model, token_count, latency_ms,
                                           metadata_json, created_at)
    values (thread, alice, 'assistant', turn.a, question, 'meta/meta-llama-3-8b-instruct', turn.output_tokens,
            900 + turn.n * 70, '{"route": "chat", "seed": true}', now() - turn.ago + interval '2 seconds')
    returning id into answer;
    update public.assistant_runs
       set status = 'completed', attempts = 1, admitted_at = now() - turn.ago, finished_at = now() - turn.ago
     where message_id = question;
    insert into public.assistant_inference_events (user_id, thread_id, message_id, run_id, provider, model, status,
                                                   latency_ms, input_tokens, output_tokens, cost_estimate_usd, created_at)
    select alice, thread, question, r.id, 'replicate', 'meta/meta-llama-3-8b-instruct', 'succeeded', 900 + turn.n * 70,
           turn.input_tokens, turn.output_tokens, turn.cost, now() - turn.ago
      from public.assistant_runs r where r.message_id = question;
    if turn.n = 2 then
      insert into public.ai_feedback (user_id, message_id, rating, comment)
      values (alice, answer, 1, 'Exactly what I needed');
    end if;
    if turn.n = 3 then
      insert into public.assistant_follow_ups (user_id, thread_id, message_id, position, suggestion) values
        (alice, thread, answer, 1, 'Which shoes go with a navy blazer?'),
        (alice, thread, answer, 2, 'How do I care for a wool blazer?');
    end if;
  end loop;
  perform public.ai_usage_add(alice, '{"messages": 1, "requests": 1, "tokens": 59, "cost_usd": 0.000008}');

  -- Bob, on premium: an image question whose request failed once, then succeeded.
  insert into public.assistant_threads (user_id, title, assistant_id, created_at)
  values (bob, 'Does this jacket fit?', stylist, now() - interval '5 hours') returning id into thread;
  insert into public.assistant_messages (thread_id, user_id, role, content, image_url, created_at)
  values (thread, bob, 'user', 'Does this jacket look too big on me?', 'https://images.example/jacket.jpg',
          now() - interval '5 hours') returning id into question;
  insert into public.assistant_messages (thread_id, user_id, role, content, reply_to, model, token_count, latency_ms,
                                         metadata_json, created_at)
  values (thread, bob, 'assistant', 'The shoulders sit about two centimetres past yours; one size down would fit better.',
          question, 'yorickvp/llava-13b', 22, 4100, '{"route": "vision", "seed": true}', now() - interval '5 hours');
  update public.assistant_runs set status = 'completed', attempts = 2, admitted_at = now() - interval '5 hours',
                                   finished_at = now() - interval '5 hours'
   where message_id = question;
  insert into public.assistant_inference_events (user_id, thread_id, message_id, run_id, attempt, provider, model, status,
                                                 latency_ms, error_code, cost_estimate_usd, created_at)
  select bob, thread, question, r.id, a.attempt, 'replicate', 'yorickvp/llava-13b', a.status, a.latency, a.code, a.cost,
         now() - interval '5 hours'
    from public.assistant_runs r,
         (values (1, 'failed', 30000, 'timeout', null::numeric), (2, 'succeeded', 4100, null, 0.002973)) a(attempt, status, latency, code, cost)
   where r.message_id = question;
end
$$;

select public.refresh_ai_usage_reports();
