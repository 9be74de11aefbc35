"""The `memory:` section of fleet.yaml: conversation compaction (serve/conversation_memory.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MemorySettings(BaseModel):
    """Every field has a working default: compaction is on, the cheapest capable model summarises."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="compact conversations that outgrow the answering model's context"
    )
    summarizer: str | None = Field(
        None,
        description="the model (name or alias) that writes the running summary; default: the cheapest "
        "capable fleet model",
    )
    reserve_tokens: int = Field(
        512, ge=16, description="tokens kept free for the answer when the request sets no larger max tokens"
    )
    default_context: int | None = Field(
        None,
        gt=0,
        description="context assumed for a model that states none (a remote model without "
        "max_context); None: such a model's conversations are passed on unchanged",
    )
    archive_path: str | None = Field(
        None,
        description="SQLite file of archived turns and summaries; default: <index file>-memory.db "
        "next to the knowledge index (serve/files_api.index_path)",
    )
