-- Local development data, applied after the migrations by `supabase db reset` and by
-- `python -m worker db up|reset`. Never part of `supabase db push`.
-- Nothing is seeded yet: the schema is usable empty.
select 1;
