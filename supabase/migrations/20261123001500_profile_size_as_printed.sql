-- A profile is at most 4 kB as printed, too (found by a security review).
--
-- ai_profiles_at_most_4kb counts the stored (binary) size of goals and preferences. A jsonb
-- number is stored in a few bytes whatever its printed length: `{"x": 1e5000}` takes 30 bytes
-- and prints as a 5,001-digit integer. That is what the worker reads (claim_runs sends the
-- profile with each run), and Python refuses to read integers of more than 4,300 digits: one
-- user's profile made every claim carrying their run fail, with the other runs of that claim.
-- The worker now reads any integer jsonb can hold (worker/jsonload.py); this constraint keeps
-- what a user writes as small as the 4 kB they are told. Added NOT VALID: rows written before
-- are not checked (the worker reads them), every insert and update from now on is.

alter table public.ai_profiles
  add constraint ai_profiles_at_most_4kb_as_text
  check (octet_length(goals::text) + octet_length(preferences::text) <= 4096) not valid;

comment on constraint ai_profiles_at_most_4kb_as_text on public.ai_profiles is
  'goals and preferences together take at most 4 kB as printed (a number like 1e5000 is small stored and long printed).';
