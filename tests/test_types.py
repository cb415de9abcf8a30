"""types/database.types.ts is what postgres-meta (the generator behind `supabase gen types
typescript`) prints for the migrated schema, byte for byte."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

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


def fake_node(folder: Path, version: str) -> Path:
    node = folder / "node"
    node.write_text(f'#!/bin/sh\n[ "$1" = "-p" ] && [ "$2" = "process.versions.node" ] && echo {version} && exit 0\nexit 1\n')
    node.chmod(0o755)
    return node


def test_a_node_older_than_20_on_path_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = fake_node(tmp_path, "18.19.0")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert typegen.node_major(str(old)) == 18
    # The wheel's node where `make` installed it (not on this machine if its own node is new enough), else none.
    assert typegen.node_executable() != str(old)


def test_a_node_of_20_or_later_on_path_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    new = fake_node(tmp_path, "22.11.0")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert typegen.node_executable() == str(new)
