"""Test fixtures: one embedded PostgreSQL cluster per test session, a migrated template database,
and fresh copies of it for the tests that write."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from worker import migrations
from worker.localdb import LocalDatabase

PROJECT_DIR = Path(__file__).resolve().parent.parent
TEMPLATE = "migrated_template"
_names = itertools.count()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDatabase]:
    db = LocalDatabase(tmp_path_factory.mktemp("cluster"), fast=True)
    db.start()
    yield db
    db.destroy()


@pytest.fixture(scope="session")
def template_db(cluster: LocalDatabase) -> str:
    url = cluster.create_database(TEMPLATE)
    migrations.prepare(url, project_dir=PROJECT_DIR)
    return TEMPLATE


@pytest.fixture
def db_url(cluster: LocalDatabase, template_db: str) -> str:
    """A fresh, fully migrated database for one test."""
    return cluster.create_database(f"test_{next(_names)}", template=template_db)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """A superuser connection in autocommit mode (the test opens transactions itself)."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection
