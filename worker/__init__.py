"""AI-assistant backend for Supabase apps: the worker daemon and its local tooling."""
