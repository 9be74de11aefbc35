"""Named assistants from fleet.yaml, served as model names: instructions, vector stores and tools around a
fleet model (or `auto`), applied to a chat request before routing."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleetlm.serve.protocol import ChatCompletionRequest, ChatMessage, FileSearchOptions, Tool

OWNED_BY = "fleetlm-assistant"


class Assistant(BaseModel):
    """One entry of `assistants:` in fleet.yaml."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="the fleet model (name or alias) or the router (`auto`) that answers")
    instructions: str | None = Field(None, description="the first system message of every request")
    vector_store_ids: list[str] = Field(
        default_factory=list, description="vector store ids or names (resolved at request time); "
        "each request is grounded in them (fleet_file_search), which is the assistant's file_search")
    max_num_results: int = Field(5, ge=1, le=50, description="sources retrieved per request")
    tools: list[Tool] = Field(default_factory=list, description="function tools, in OpenAI's shape")
    description: str | None = None


Assistants = dict[str, Assistant]


def check_assistants(assistants: Assistants, names: set[str], router: str | None) -> None:
    """At load: an assistant may not shadow a model or the router, and must name one that exists."""
    for name, assistant in assistants.items():
        if name in names or name == router:
            raise ValueError(f"assistants.{name}: the name is already a model's or the router's")
        if assistant.model not in names and assistant.model != router:
            raise ValueError(f"assistants.{name}.model: unknown model {assistant.model!r}")


def find_assistant(config: Any, name: str) -> Assistant | None:
    """The assistant served under `name`, None when it is not one."""
    return (getattr(config, "assistants", None) or {}).get(name)


def apply(assistant: Assistant, req: ChatCompletionRequest) -> ChatCompletionRequest:
    """The request as the assistant sends it: its instructions first, its tools before the caller's, its
    vector stores as fleet_file_search (unless the request brings its own), its model."""
    messages = list(req.messages)
    if assistant.instructions:
        messages.insert(0, ChatMessage(role="system", content=assistant.instructions))
    update: dict[str, Any] = {"messages": messages, "model": assistant.model}
    if assistant.tools:
        update["tools"] = [*assistant.tools, *(req.tools or [])]
    if assistant.vector_store_ids and req.fleet_file_search is None:
        update["fleet_file_search"] = FileSearchOptions(
            vector_store_ids=assistant.vector_store_ids, max_num_results=assistant.max_num_results
        )
    return req.model_copy(update=update)
