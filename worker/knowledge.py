"""The knowledge base: embeddings from a Replicate embedding model, retrieval through
`search_knowledge` (pgvector, HNSW), and `python -m worker kb ingest PATH…`."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from worker.config import Settings
from worker.prompts import KnowledgeChunk, fill_input
from worker.provider import ProviderError, ReplicateClient
from worker.store import RunStore

TEXT_SUFFIXES = {".md", ".markdown", ".txt"}


def vector_literal(vector: list[float]) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


class Embedder:
    def __init__(self, provider: ReplicateClient, settings: Settings) -> None:
        self.provider = provider
        self.settings = settings

    async def embed(self, texts: list[str], token: str | None = None) -> list[list[float]]:
        """One embedding per text, in order, in one prediction (on `token`, else the operator's)."""
        model = self.settings.embedding_model
        model_input = fill_input(model.input, {"texts": json.dumps(texts), "text": texts[0] if len(texts) == 1 else None})
        prediction, _ = await self.provider.run(model, model_input, token)
        vectors = self._vectors(prediction.get("output"))
        if len(vectors) != len(texts):
            raise ProviderError("invalid_output", f"{len(vectors)} embeddings for {len(texts)} texts", retryable=True)
        for vector in vectors:
            if len(vector) != self.settings.embedding_dimensions:
                raise ProviderError("invalid_output", f"embedding of {len(vector)} dimensions, expected "
                                    f"{self.settings.embedding_dimensions}", retryable=False)
        return vectors

    @staticmethod
    def _vectors(output: Any) -> list[list[float]]:
        """Accepts [{"embedding": [...]}, …], [[...], …] or a single [...]."""
        if isinstance(output, dict) and "embeddings" in output:
            output = output["embeddings"]
        if isinstance(output, list) and output and all(isinstance(x, (int, float)) for x in output):
            output = [output]
        vectors = []
        for item in output if isinstance(output, list) else []:
            vector = item.get("embedding") if isinstance(item, dict) else item
            if not isinstance(vector, list) or not all(isinstance(x, (int, float)) for x in vector):
                raise ProviderError("invalid_output", "embedding output is not a list of numbers", retryable=True)
            vectors.append([float(x) for x in vector])
        if not vectors:
            raise ProviderError("invalid_output", "no embeddings in the output", retryable=True)
        return vectors


async def retrieve(store: RunStore, embedder: Embedder, settings: Settings, query: str, *,
                   assistant_id: str | None, user_id: uuid.UUID | None, run_id: uuid.UUID | None,
                   token: str | None = None) -> list[KnowledgeChunk]:
    [vector] = await embedder.embed([query], token)
    rows = await store.call("search_knowledge", {
        "p_query": query, "p_query_embedding": vector_literal(vector), "p_assistant_id": assistant_id,
        "p_user_id": user_id, "p_run_id": run_id, "p_match_threshold": settings.knowledge_match_threshold,
        "p_match_count": settings.knowledge_match_count}, rows=True)
    return [KnowledgeChunk(str(r["id"]), str(r["document_id"]), r["source"], r["content"], float(r["similarity"]))
            for r in rows]


# -- ingest ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    source: str
    title: str
    text: str


def find_documents(paths: Iterable[Path]) -> list[Document]:
    documents = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES) if path.is_dir() else [path]
        for file in files:
            if file.suffix.lower() not in TEXT_SUFFIXES:
                raise ValueError(f"{file}: only text and Markdown files ({', '.join(sorted(TEXT_SUFFIXES))}) can be ingested")
            text = file.read_text(encoding="utf-8")
            heading = re.search(r"^#\s+(.+)$", text, re.MULTILINE)
            documents.append(Document(file.as_posix(), heading.group(1).strip() if heading else file.stem, text))
    return documents


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Paragraphs packed into chunks of at most `max_chars`, each led by its Markdown heading."""
    chunks: list[str] = []
    heading = ""
    current = ""
    for block in re.split(r"\n\s*\n", text.strip()):
        block = block.strip()
        if not block:
            continue
        if block.startswith("#"):
            if current:
                chunks.append(current)
            heading, current = block.splitlines()[0].lstrip("#").strip(), block
            continue
        candidate = f"{current}\n\n{block}" if current else (f"{heading}\n\n{block}" if heading else block)
        if len(candidate) <= max_chars:
            current = candidate
            continue
        if current:
            chunks.append(current)
        while len(block) > max_chars:  # a paragraph longer than a chunk is cut
            chunks.append(block[:max_chars])
            block = block[max_chars:]
        current = f"{heading}\n\n{block}" if heading and len(heading) + len(block) + 2 <= max_chars else block
    if current:
        chunks.append(current)
    return chunks


@dataclass
class IngestReport:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    chunks: int = 0

    def __str__(self) -> str:
        total = self.created + self.updated + self.unchanged
        return (f"{total} documents: {self.created} created, {self.updated} updated, {self.unchanged} unchanged;"
                f" {self.chunks} chunks embedded")


async def ingest(store: RunStore, embedder: Embedder, settings: Settings, paths: list[Path],
                 assistant_id: str | None = None, progress: bool = True) -> IngestReport:
    """Chunk, embed and store each document; documents whose text, chunking and embedding model
    are unchanged since the last run are skipped."""
    report = IngestReport()
    known = {r["source"]: r["content_hash"]
             for r in await store.call("kb_document_hashes", {"p_assistant_id": assistant_id}, rows=True)}
    todo = []
    for document in find_documents(paths):
        fingerprint = f"{settings.embedding_model.slug}:{settings.knowledge_chunk_chars}:{document.text}"
        content_hash = hashlib.sha256(fingerprint.encode()).hexdigest()
        if known.get(document.source) == content_hash:
            report.unchanged += 1
        else:
            todo.append((document, content_hash, chunk_text(document.text, settings.knowledge_chunk_chars)))
    bar = tqdm(total=sum(len(chunks) for _, _, chunks in todo), unit="chunk", desc="embedding", disable=not progress)
    for document, content_hash, chunks in todo:
        vectors: list[list[float]] = []
        for start in range(0, len(chunks), settings.knowledge_embed_batch):
            batch = chunks[start:start + settings.knowledge_embed_batch]
            vectors += await embedder.embed(batch)
            bar.update(len(batch))
        outcome = await store.call("kb_upsert_document", {
            "p_source": document.source, "p_title": document.title, "p_content_hash": content_hash,
            "p_chunks": [{"content": c, "embedding": vector_literal(v)} for c, v in zip(chunks, vectors, strict=True)],
            "p_assistant_id": assistant_id, "p_metadata": {"chunks": len(chunks)}})
        setattr(report, outcome, getattr(report, outcome) + 1)
        report.chunks += len(chunks)
    bar.close()
    return report
