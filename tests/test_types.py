"""types/database.types.ts is what postgres-meta (the generator behind `supabase gen types
typescript`) prints for the migrated schema, byte for byte."""

from __future__ import annotations

import difflib

from worker import typegen


def test_checked_in_types_match_the_migrations(db_url: str) -> None:
    generated = typegen.generate(db_url)
    path = typegen.DEFAULT_OUTPUT
    checked_in = path.read_bytes() if path.exists() else b""
    if generated != checked_in:
        name = str(path.relative_to(typegen.PROJECT_DIR))
        diff = difflib.unified_diff(checked_in.decode(errors="replace").splitlines(),
                                    generated.decode(errors="replace").splitlines(),
                                    f"{name} (checked in)", f"{name} (from the migrations)", lineterm="")
        excerpt = "\n".join(list(diff)[:60])
        raise AssertionError(f"{name} does not match the migrations: run `make types` and commit the result\n{excerpt}")
