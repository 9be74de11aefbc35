"""The `knowledge:` section of fleet.yaml: where the knowledge base keeps its index and files; its limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class KnowledgeSettings(BaseModel):
    """Files, vector stores and search (fleetlm.rag); every field has a working default."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["sqlite", "milvus"] = Field(
        "sqlite",
        description="sqlite: everything in one embedded SQLite file (rag/store.py); milvus: vectors and BM25 "
        "in Milvus, metadata in SQL (rag/milvus_store.py; needs the `milvus` extra)",
    )
    index_path: str | None = Field(
        None,
        description="SQLite file of the index and metadata; default: the fleet's own SQLite database "
        "file, or <fleet home>/knowledge.db when storage is not a SQLite file",
    )
    files_dir: str | None = Field(None, description="where uploaded bytes live; default <fleet home>/files")
    max_upload_bytes: int = Field(512 * 1024 * 1024, gt=0, description="largest upload to /v1/files")
    embed_batch: int = Field(32, gt=0, le=1024, description="chunks embedded (and committed) together")
    milvus_uri: str | None = Field(
        None,
        description="backend milvus: `http://host:19530` (a Milvus server or cluster) or a local `.db` path "
        "(the embedded milvus-lite); default <fleet home>/knowledge-milvus.db",
    )
    milvus_token: str | None = Field(None, description="backend milvus: `user:password` or an API key")
    milvus_collection: str = Field(
        "fleet_kb_chunks", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$", description="backend milvus: collection"
    )
    milvus_index: Literal["FLAT", "HNSW", "IVF_FLAT", "AUTOINDEX"] = Field(
        "FLAT",
        description="backend milvus: the dense vector index (FLAT is exact, as the embedded store; HNSW or "
        "AUTOINDEX for millions of chunks on a Milvus server); read when the collection is created",
    )
    meta_url: str | None = Field(
        None,
        description="backend milvus: SQLAlchemy URL of the metadata database; default: the fleet's storage "
        "when it is PostgreSQL, else sqlite:///<index_path>",
    )
