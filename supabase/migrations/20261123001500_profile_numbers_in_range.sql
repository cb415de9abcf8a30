-- Numbers in a profile stay printable (found by a security review).
--
-- ai_profiles_at_most_4kb counts the stored (binary) size of goals and preferences. A jsonb
-- number is stored in a few bytes whatever its printed length: `{"x": 1e5000}` takes 30 bytes
-- and prints as a 5,001-digit integer. That is what the worker reads (claim_runs sends the
-- profile with each run), and Python refuses to read integers of more than 4,300 digits: one
-- user's profile made every claim carrying their run fail, with the other runs of that claim.
-- The worker now reads any integer jsonb can hold (worker/jsonload.py); this constraint keeps
-- a profile's numbers between 1e-100 and 1e100 in magnitude (or 0), at most about 100 digits
-- printed, so that no profile costs the worker more than it looks. Added NOT VALID: rows
-- written before are not checked here (20261123001700 clears and validates them); every
-- insert and update from now on is.

alter table public.ai_profiles
  add constraint ai_profiles_numbers_in_range
  check (not jsonb_path_exists(goals, 'strict $.** ? (@.type() == "number" && (@ >= 1e100 || @ <= -1e100 || (@ != 0 && @ < 1e-100 && @ > -1e-100)))')
     and not jsonb_path_exists(preferences, 'strict $.** ? (@.type() == "number" && (@ >= 1e100 || @ <= -1e100 || (@ != 0 && @ < 1e-100 && @ > -1e-100)))'))
  not valid;

comment on constraint ai_profiles_numbers_in_range on public.ai_profiles is
  'Numbers in goals and preferences are 0 or between 1e-100 and 1e100 in magnitude (1e5000 is a few bytes stored and 5,001 digits printed).';
