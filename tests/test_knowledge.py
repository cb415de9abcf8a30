"""The knowledge base on real pgvector: ingest (idempotent), retrieval with known answers, the
HNSW index, assistant scoping, and retrieval in the reply pipeline."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import PROJECT_DIR
from tests.pipeline_helpers import as_user, finished_runs, new_user_thread, query, running_worker, say, worker_settings
from worker.app import replicate_http
from worker.knowledge import Embedder, chunk_text, ingest, retrieve
from worker.provider import ReplicateClient
from worker.simulator import ReplicateSimulator
from worker.store import PostgresStore

CORPUS = {
    "billing.md": "# Billing\n\nInvoices are sent on the first day of each month.\n\n"
                  "You can download past invoices from the billing page of your account.",
    "security.md": "# Account security\n\nTo reset your password, open Settings, choose Security and click Reset"
                   " password. A reset link is emailed to you and expires after one hour.",
    "shipping.txt": "Orders ship within two business days. International shipping takes seven to ten days;"
                    " tracking numbers are emailed when the parcel leaves the warehouse.",
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "kb"
    folder.mkdir()
    for name, text in CORPUS.items():
        (folder / name).write_text(text)
    return folder


async def ingest_corpus(db_url: str, simulator: ReplicateSimulator, paths: list[Path], assistant_id: str | None = None):
    settings = worker_settings(simulator.base_url)
    store = await PostgresStore.connect(db_url)
    try:
        async with replicate_http(settings) as http:
            embedder = Embedder(ReplicateClient(http, settings), settings)
            return await ingest(store, embedder, settings, paths, assistant_id, progress=False)
    finally:
        await store.close()


async def ask(db_url: str, simulator: ReplicateSimulator, question: str, assistant_id: str | None = None):
    settings = worker_settings(simulator.base_url)
    store = await PostgresStore.connect(db_url)
    try:
        async with replicate_http(settings) as http:
            embedder = Embedder(ReplicateClient(http, settings), settings)
            return await retrieve(store, embedder, settings, question, assistant_id=assistant_id,
                                  user_id=None, run_id=None)
    finally:
        await store.close()


def test_chunks_keep_their_heading_and_stay_within_bounds() -> None:
    text = "# Guide\n\n" + "\n\n".join(f"Paragraph {i} " + "word " * 40 for i in range(10)) + "\n\n## Next\n\nShort."
    chunks = chunk_text(text, 500)
    assert all(len(c) <= 500 for c in chunks)
    assert chunks[0].startswith("# Guide") and all(c.startswith(("Guide", "# Guide", "## Next")) for c in chunks)
    assert chunks[-1] == "## Next\n\nShort."
    assert "".join(chunks).count("Paragraph") == 10


@pytest.mark.parametrize(("question", "source"), [
    ("How do I reset my password?", "security.md"),
    ("When are invoices sent?", "billing.md"),
    ("How long does international shipping take?", "shipping.txt"),
])
async def test_retrieval_returns_the_chunk_that_answers(db_url, simulator, corpus: Path, question: str, source: str) -> None:
    await ingest_corpus(db_url, simulator, [corpus])
    chunks = await ask(db_url, simulator, question)
    assert chunks and chunks[0].source.endswith(source)
    assert chunks == sorted(chunks, key=lambda c: -c.similarity)
    [search] = await query(db_url, "select query, result_count, top_similarity from kb_searches")
    assert search["query"] == question and search["result_count"] == len(chunks)
    assert search["top_similarity"] == pytest.approx(chunks[0].similarity)


async def test_unrelated_questions_find_nothing_above_the_threshold(db_url, simulator, corpus: Path) -> None:
    await ingest_corpus(db_url, simulator, [corpus])
    assert await ask(db_url, simulator, "Zebras migrate across savannas") == []


async def test_the_hnsw_index_answers_nearest_neighbour_queries(db_url, simulator, corpus: Path) -> None:
    await ingest_corpus(db_url, simulator, [corpus])
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        await conn.execute("set enable_seqscan = off")
        plan = await (await conn.execute(
            "explain select id from kb_chunks order by embedding operator(extensions.<=>)"
            " (select embedding from kb_chunks limit 1) limit 3")).fetchall()
    assert "idx_kb_chunks_embedding" in "\n".join(row[0] for row in plan)


async def test_ingest_twice_skips_unchanged_files_and_updates_changed_ones(db_url, simulator, corpus: Path) -> None:
    first = await ingest_corpus(db_url, simulator, [corpus])
    assert (first.created, first.updated, first.unchanged) == (3, 0, 0)
    embedding_calls = len(simulator.creates)
    chunk_ids = {r["id"] for r in await query(db_url, "select id from kb_chunks")}
    again = await ingest_corpus(db_url, simulator, [corpus])
    assert (again.created, again.updated, again.unchanged, again.chunks) == (0, 0, 3, 0)
    assert len(simulator.creates) == embedding_calls  # nothing was embedded again
    assert {r["id"] for r in await query(db_url, "select id from kb_chunks")} == chunk_ids
    (corpus / "billing.md").write_text("# Billing\n\nInvoices are now sent on the fifteenth of each month.")
    changed = await ingest_corpus(db_url, simulator, [corpus])
    assert (changed.created, changed.updated, changed.unchanged) == (0, 1, 2)
    chunks = await ask(db_url, simulator, "When are invoices sent?")
    assert "fifteenth" in chunks[0].content
    assert len(await query(db_url, "select id from kb_documents")) == 3


async def test_documents_of_an_assistant_stay_with_it(db_url, simulator, corpus: Path, tmp_path: Path) -> None:
    [row] = await query(db_url, "insert into assistants (slug, name) values ('shop', 'Shop') returning id")
    shop = str(row["id"])
    secret = tmp_path / "shop-only.md"
    secret.write_text("# Returns\n\nReturns are accepted within thirty days with the receipt.")
    await ingest_corpus(db_url, simulator, [corpus])
    await ingest_corpus(db_url, simulator, [secret], assistant_id=shop)
    assert (await ask(db_url, simulator, "Are returns accepted with a receipt?", shop))[0].source.endswith("shop-only.md")
    assert not [c for c in await ask(db_url, simulator, "Are returns accepted with a receipt?") if "Returns" in c.content]


async def test_the_ingest_command_is_safe_to_rerun(db_url, simulator, corpus: Path) -> None:
    env = {**os.environ, "DATABASE_URL": db_url, "WORKER_TRANSPORT": "postgres", "REPLICATE_API_TOKEN": "r8_test",
           "REPLICATE_BASE_URL": simulator.base_url}

    async def run() -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "kb", "ingest", str(corpus), cwd=PROJECT_DIR, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode == 0, err.decode()
        return out.decode().strip().splitlines()[-1]

    assert await run() == "3 documents: 3 created, 0 updated, 0 unchanged; 3 chunks embedded"
    assert await run() == "3 documents: 0 created, 0 updated, 3 unchanged; 0 chunks embedded"


async def test_the_assistant_answers_with_retrieved_knowledge(db_url, simulator, corpus: Path) -> None:
    await ingest_corpus(db_url, simulator, [corpus])
    [assistant] = await query(db_url, "insert into assistants (slug, name, instructions, features) values"
                                      " ('helpdesk', 'Helpdesk', 'You answer support questions.', '{knowledge_base}')"
                                      " returning id")
    user, thread = await new_user_thread(db_url)
    await query(db_url, "update assistant_threads set assistant_id = %s where id = %s returning id", (assistant["id"], thread))
    async with running_worker(worker_settings(simulator.base_url), db_url):
        message = await say(db_url, user, thread, "How do I reset my password?")
        [run] = await finished_runs(db_url, 1)
    assert run["status"] == "completed"
    chat = [c for c in simulator.creates if "prompt" in c.body["input"]][-1]
    prompt = chat.body["input"]["prompt"]
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer support questions.")
    assert "To reset your password, open Settings" in prompt and "[" in prompt
    [reply] = await query(db_url, "select metadata_json from assistant_messages where reply_to = %s", (message,))
    used = reply["metadata_json"]["knowledge"]
    assert used[0]["source"].endswith("security.md") and used[0]["similarity"] > 0.2
    [search] = await query(db_url, "select assistant_id, run_id, result_count from kb_searches")
    assert search["assistant_id"] == assistant["id"] and search["run_id"] == run["id"] and search["result_count"] >= 1


async def test_a_retrieval_the_database_refuses_leaves_the_reply_without_knowledge(db_url, simulator, monkeypatch) -> None:
    """An embedding pgvector cannot take (NaN), or any other failure of the retrieval, is not the
    reply's failure: it is answered without knowledge, and the reason kept."""
    import worker.knowledge

    async def nan_vectors(self, texts, token=None):  # what a model answering NaN gives, parsed by the standard library
        return [[float("nan")] * 768 for _ in texts]

    monkeypatch.setattr(worker.knowledge.Embedder, "embed", nan_vectors)
    [assistant] = await query(db_url, "insert into assistants (slug, name, instructions, features) values"
                                      " ('helpdesk', 'Helpdesk', 'You answer support questions.', '{knowledge_base}')"
                                      " returning id")
    user, thread = await new_user_thread(db_url)
    await query(db_url, "update assistant_threads set assistant_id = %s where id = %s returning id", (assistant["id"], thread))
    async with running_worker(worker_settings(simulator.base_url), db_url):
        message = await say(db_url, user, thread, "How do I reset my password?")
        [run] = await finished_runs(db_url, 1)
    assert (run["status"], run["attempts"]) == ("completed", 1)
    [reply] = await query(db_url, "select metadata_json from assistant_messages where reply_to = %s", (message,))
    assert reply["metadata_json"]["knowledge_error"] == "retrieval_failed"


async def test_a_byok_users_lookup_is_embedded_on_their_own_token(db_url, simulator, corpus: Path) -> None:
    """Every prediction of a BYOK request runs on the user's token, the query's embedding too:
    the operator's account pays for none of it (and a user without a working token gets no
    lookups on the operator's account)."""
    from cryptography.fernet import Fernet

    await ingest_corpus(db_url, simulator, [corpus])  # the operator's documents, on the operator's token
    own_token = "r8_UserOwnToken0123456789abcdefghijkl"
    own = ReplicateSimulator(latency=0.02, token=own_token)  # accepts only the user's token
    await own.start()
    try:
        [assistant] = await query(db_url, "insert into assistants (slug, name, features) values"
                                          " ('helpdesk', 'Helpdesk', '{knowledge_base}') returning id")
        user, thread = await new_user_thread(db_url, plan="byok")
        await query(db_url, "update assistant_threads set assistant_id = %s where id = %s returning id",
                    (assistant["id"], thread))
        await as_user(db_url, user, "select set_my_replicate_token(%s)", (own_token,))
        settings = worker_settings(own.base_url, replicate_api_token="r8_operator_token",
                                   byok_encryption_key=Fernet.generate_key().decode())
        async with running_worker(settings, db_url):
            message = await say(db_url, user, thread, "How do I reset my password?")
            [run] = await finished_runs(db_url, 1)
    finally:
        await own.stop()
    assert run["status"] == "completed"
    assert len(own.creates) == 2  # the embedding and the reply
    assert {c.headers["Authorization"] for c in own.creates} == {f"Bearer {own_token}"}
    [reply] = await query(db_url, "select metadata_json from assistant_messages where reply_to = %s", (message,))
    assert "knowledge_error" not in reply["metadata_json"]
    assert reply["metadata_json"]["knowledge"][0]["source"].endswith("security.md")
