"""Pydantic models of OpenAI's chat, completions and embeddings protocol, as the gateway speaks it.

Requests ignore unknown fields (clients send vendor extras) but reject wrong types and absurd values, which
the app turns into a 400 in OpenAI's error shape.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from fleetlm.serve.errors import BadRequest

MAX_TOKENS_LIMIT = 1_000_000  # anything larger is a client bug, not a wish
MAX_N = 16
MAX_COMPLETION_CHOICES = 64  # prompts x n in one completions request: each is a row of a batch
MAX_STOP = 4


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------- requests


class ImageUrl(_Request):
    """An image_url part's image: an https or data: URL (read by fleetlm/vision), and OpenAI's detail hint."""

    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Request):
    type: str
    text: str | None = None
    image_url: ImageUrl | None = None
    file: dict[str, Any] | None = None  # {"file_id": ...} of an upload (/v1/files), read by serve/vision.py
    # {"data": base64, "format": "wav" | "mp3"}: becomes a text part before routing (serve/voice_chat.py)
    input_audio: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _image_has_url(self) -> ContentPart:
        if self.type == "image_url" and self.image_url is None:
            raise ValueError('an image_url part needs image_url: {"url": "https://..." or "data:image/..."}')
        return self


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text; other parts are dropped (serve/vision.py has made images text by then)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class FunctionDef(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class McpServerTool(_Request):
    """A `{"type": "mcp"}` tools entry, in the shape of OpenAI's Responses API: the tools of one of the MCP
    servers fleet.yaml names (`server_label`), which the gateway lists and calls (serve/mcp_tools.py)."""

    type: Literal["mcp"]
    server_label: str = Field(min_length=1, max_length=64)
    allowed_tools: list[str] | None = None  # the server's own tool names (or <server>__<tool>); None: all
    require_approval: str | dict[str, Any] | None = None
    server_description: str | None = None
    # Which servers exist and how they are reached come from fleet.yaml only: a request must not make the
    # gateway start a process or reach a URL. These fields are read only to refuse them.
    server_url: Any = Field(None, exclude=True)
    connector_id: Any = Field(None, exclude=True)
    headers: Any = Field(None, exclude=True)
    authorization: Any = Field(None, exclude=True)

    @field_validator("server_url", "connector_id", "headers", "authorization")
    @classmethod
    def _only_configured_servers(cls, v: Any, info: Any) -> Any:
        if v is not None:
            raise ValueError(f"{info.field_name} is not accepted: this gateway calls only the MCP servers "
                             "its fleet.yaml names (mcp_servers), chosen by server_label")
        return v

    @field_validator("require_approval")
    @classmethod
    def _never(cls, v: Any) -> Any:
        if v not in (None, "never"):
            raise ValueError("only 'never' is supported: the gateway runs MCP tools without asking for "
                             "approval")
        return v


def _tool_kind(v: Any) -> str | None:
    kind = v.get("type") if isinstance(v, dict) else getattr(v, "type", None)
    return {"function": "function-tool", "mcp": "mcp-tool"}.get(kind) if isinstance(kind, str) else None


# A tools entry, told apart by its type. The tags hold a "-" so that parse_request leaves them out of an
# error's param (as it does pydantic's union member labels): a bad function tool is still
# "tools.0.function.name".
ToolEntry = Annotated[
    Annotated[Tool, Tag("function-tool")] | Annotated[McpServerTool, Tag("mcp-tool")],
    Discriminator(_tool_kind, custom_error_type="tool_type",
                  custom_error_message="a tool's type must be 'function' or 'mcp'"),
]


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _Sampling(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI takes it
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class FileSearchOptions(BaseModel):
    """`fleet_file_search` on a chat request: answer from vector stores, with citations."""

    model_config = ConfigDict(extra="forbid")
    vector_store_ids: list[str] = Field(min_length=1, max_length=16)
    max_num_results: int = Field(5, ge=1, le=50)
    filters: dict[str, Any] | None = None
    score_threshold: float = Field(0.0, ge=0.0, le=1.0)
    include_results: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Function tools, and {"type": "mcp"} entries, which the gateway turns into their servers' function
    # tools before any backend sees the request (serve/mcp_tools.py): backends only get Tool entries.
    tools: list[ToolEntry] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # OpenAI's default: several calls may come in one answer
    response_format: ResponseFormat | None = None
    # fleetlm's extras, never forwarded upstream (exclude): the switch that turns the grammar of tool calls
    # and response_format off (the baseline of bench/bfcl.py), and the kind of agent step a request is,
    # which the router of `auto` reads (see serve/routing.py).
    constrained_decoding: bool = Field(True, exclude=True)
    fleet_step: str | None = Field(None, max_length=32, exclude=True)
    # OpenAI's spoken answers, served by the gateway itself (serve/voice_chat.py), so never forwarded:
    # modalities ["text", "audio"] with audio {"voice", "format"}.
    modalities: list[str] | None = Field(None, exclude=True)
    audio: dict[str, Any] | None = Field(None, exclude=True)
    # Retrieval from vector stores before the model answers, with citations (serve/chat_grounding.py).
    fleet_file_search: FileSearchOptions | None = Field(None, exclude=True)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    # Text, texts, token ids, or lists of token ids, as OpenAI's API takes them.
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v: str | list) -> str | list:
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _bounded_work(self) -> CompletionRequest:
        if len(self.prompts()) * self.n > MAX_COMPLETION_CHOICES:
            raise ValueError(f"prompts x n must be at most {MAX_COMPLETION_CHOICES}")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text, or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]

    def token_limit(self) -> int | None:
        return self.max_tokens


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class EmbeddingRequest(_Request):
    model: str = Field(min_length=1)
    # A string, strings, token ids, or lists of token ids (OpenAI's four shapes); the order matters: a list
    # of ints must not be read as strings.
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[
            list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
        ]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[TokenId], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS),
        ]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _one_shape(cls, v: Any) -> Any:
        # Checked here so that a bad input gets one plain message, not one error per union member.
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(type(t) is int and 0 <= t < 2**31 for t in x)

        if isinstance(v, str):
            if not v:
                raise ValueError("must not be empty")
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty string or list")
        if len(v) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(v)}")
        if all(isinstance(x, str) for x in v):
            if not all(v):
                raise ValueError("an input must not be empty")
            return v
        if ids(v) or all(ids(x) for x in v):
            return v
        raise ValueError(
            "must be a string, a list of strings, a list of token ids (ints >= 0) or a list of such lists"
        )

    def items(self) -> list[str] | list[list[int]]:
        """The inputs, one per embedding: strings, or token id lists."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]

    def texts(self) -> list[str]:
        """The inputs as strings; token ids are a 400 for a model that takes text only."""
        items = self.items()
        if not isinstance(items[0], str):
            raise BadRequest("this model takes text input, not token ids", param="input")
        return items  # type: ignore[return-value]


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _union_member(part: Any) -> bool:
    """pydantic puts the union member that failed in an error's location ("prompt.list[str]"): no field."""
    return isinstance(part, str) and (part in _TYPE_NAMES or "[" in part or "-" in part)


def parse_request(model_cls: type[BaseModel], body: bytes) -> Any:
    """Validate raw body bytes; malformed JSON, invalid UTF-8 and wrong types all become a 400 BadRequest."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return model_cls.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            raise BadRequest(f"request body is not valid JSON: {err['msg']}") from None
        if err["type"] == "model_type" and not err["loc"]:
            raise BadRequest("request body must be a JSON object") from None
        param = ".".join(str(p) for p in err["loc"] if not _union_member(p)) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise BadRequest(f"{param}: {msg}" if param else msg, param=param) from None


# ---------------------------------------------------------------- responses


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class ResponseFunctionCall(_Response):
    name: str
    arguments: str


class ResponseToolCall(_Response):
    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = "function"
    function: ResponseFunctionCall | dict[str, Any]


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(_Response):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChunkChoice(_Response):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class Completion(_Response):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "fleetlm"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
