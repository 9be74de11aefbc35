"""The `knowledge:` section of fleet.yaml: where the knowledge base keeps its index and files; its limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class KnowledgeSettings(BaseModel):
    """Files, vector stores and search (fleetlm.rag); every field has a working default."""

    model_config = ConfigDict(extra="forbid")

    index_path: str | None = Field(
        None,
        description="SQLite file of the index and metadata; default: the fleet's own SQLite database "
        "file, or <fleet home>/knowledge.db when storage is not a SQLite file",
    )
    files_dir: str | None = Field(None, description="where uploaded bytes live; default <fleet home>/files")
    max_upload_bytes: int = Field(512 * 1024 * 1024, gt=0, description="largest upload to /v1/files")
    embed_batch: int = Field(32, gt=0, le=1024, description="chunks embedded (and committed) together")
