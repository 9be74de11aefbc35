"""Tools and response_format on local models: the prompt, the constraint, and tool calls in OpenAI's shape.

`plan_chat` turns a chat request into what the engine needs: the prompt (tools rendered through the chat
template's `tools` variable when the template uses one, else listed in a system message), and the grammar
the output must follow:
- response_format json_object / json_schema: any JSON object / JSON matching the schema;
- tool_choice "required", or a named function: exactly one call, written as
  `{"name": "<a tool's name>", "arguments": {...matching that tool's parameters}}`;
- tool_choice "auto" (the default when tools are given): the model writes what it likes. The rule for
  reading a tool call out of it: the whole answer, after trimming whitespace, an optional
  `<tool_call>...</tool_call>` wrapper and an optional ```json fence, parses as one such object (or a JSON
  list of them), with "name" one of the tools and "arguments" (or "parameters", which Llama 3 templates
  write) an object. Anything else is the assistant's text;
- tool_choice "none": tools are shown to the model, and its answer is always text.

`ToolCallStream` turns a choice's streamed text into OpenAI's chunk deltas: a forced call streams its
arguments as they are generated; under "auto", an answer that starts like JSON is held back until it ends and
then sent as tool calls or as text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fleetlm.engine.constrain import (
    Grammar,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
    lark_json,
)
from fleetlm.errors import FleetError
from fleetlm.serve.protocol import ChatCompletionRequest, ChatMessage, Tool

ToolMode = Literal["none", "auto", "forced"]
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_WRAPPER = re.compile(r"^<tool_call>\s*(.*?)\s*</tool_call>$", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
TOOLS_SYSTEM_PROMPT = (
    "You can call these tools. To call one, answer with only a JSON object "
    '{"name": <the tool\'s name>, "arguments": <an object of its parameters>} and nothing else.'
)


class ToolError(FleetError):
    """A tools / tool_choice / response_format combination the request cannot have (a 400 for the client)."""


@dataclass
class ChatPlan:
    """What a chat request becomes on a local model."""

    messages: list[dict[str, Any]]  # for the chat template
    prompt_ids: list[int] | None = None  # the rendered prompt (plan_chat always renders it)
    grammar: Grammar | None = None  # the output must follow it (response_format, forced tool call)
    mode: ToolMode = "none"
    tool_names: list[str] = field(default_factory=list)

    def shape(self, text: str, finish_reason: str) -> tuple[str | None, list[dict] | None, str]:
        """(content, tool_calls, finish_reason) of a finished choice, in OpenAI's shape."""
        if self.mode == "none":
            return text, None, finish_reason
        calls = parse_tool_calls(text, self.tool_names)
        if calls is None:
            return text, None, finish_reason
        return None, [tool_call(name, args) for name, args in calls], "tool_calls"


def plan_chat(req: ChatCompletionRequest, tokenizer: Any) -> ChatPlan:
    """The prompt and grammar of a chat request for a local model; ToolError/ConstraintError if invalid."""
    tools = req.tools or []
    names = [t.function.name for t in tools]
    for name in names:
        if not _NAME.match(name):
            raise ToolError(f"tools: invalid function name {name!r} (letters, digits, _ and -, at most 64)")
    if len(set(names)) != len(names):
        raise ToolError("tools: function names must be unique")
    mode, chosen = _tool_mode(req.tool_choice, names)
    grammar = _response_grammar(req)
    if mode == "forced":
        grammar = tool_call_grammar([t for t in tools if t.function.name in chosen])
    source = _template_source(tokenizer, bool(tools))
    native = bool(re.search(r"\btools\b", source))
    messages = template_messages(req.messages, native_calls="tool_calls" in source)
    plan = ChatPlan(messages, grammar=grammar, mode=mode if tools else "none", tool_names=names)
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools] or None
    if tool_dicts and not native:
        plan.messages = _with_tools_system_message(messages, tool_dicts)
    # Rendered here, not in the engine's thread, so that a template error is the client's 400 at once.
    text = tokenizer.apply_chat_template(plan.messages, add_generation_prompt=True,
                                         tools=tool_dicts if native else None)
    # The template writes the BOS token itself, as encode_request assumes for chats.
    plan.prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    return plan


def _tool_mode(choice: Any, names: list[str]) -> tuple[ToolMode, list[str]]:
    if choice is None:
        return ("auto" if names else "none"), names
    if choice in ("none", "auto", "required"):
        if choice != "none" and not names:
            raise ToolError(f"tool_choice {choice!r} needs tools")
        return ("forced" if choice == "required" else choice), names  # type: ignore[return-value]
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise ToolError('tool_choice must be "none", "auto", "required" or '
                        '{"type": "function", "function": {"name": ...}}')
    if name not in names:
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools")
    return "forced", [name]


def _response_grammar(req: ChatCompletionRequest) -> Grammar | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_object_grammar()
    spec = fmt.json_schema
    if not isinstance(spec, dict):
        raise ToolError('response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}')
    schema = spec.get("schema", {"type": "object"})
    return json_schema_grammar(schema)


def tool_call_grammar(tools: list[Tool]) -> Grammar:
    """Exactly one call of one of `tools`: {"name": "<name>", "arguments": <its parameters' JSON>}."""
    rules = []
    for i, tool in enumerate(tools):
        params = tool.function.parameters or {"type": "object", "properties": {}}
        head = json.dumps(f'{{"name": "{tool.function.name}", "arguments": ')
        rules.append(f"call_{i}: {head} {lark_json(params)} \"}}\"")
    alternatives = " | ".join(f"call_{i}" for i in range(len(tools)))
    return lark_grammar(f"start: {alternatives}\n" + "\n".join(rules) + "\n")


# ---------------------------------------------------------------- the prompt


def _template_source(tokenizer: Any, tools: bool) -> str:
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # named templates: the tool_use one when tools are given
        source = source.get("tool_use" if tools and "tool_use" in source else "default")
    return source if isinstance(source, str) else ""


def _arguments_object(arguments: str) -> Any:
    # Templates (HF convention) expect arguments as a mapping; OpenAI sends a JSON string.
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def template_messages(messages: list[ChatMessage], native_calls: bool = True) -> list[dict[str, Any]]:
    """OpenAI messages as chat-template dicts; tool calls and results kept, or spelled out as text.

    native_calls: the template renders assistant `tool_calls` and `tool` messages itself. Otherwise a call
    becomes the assistant's JSON text and a result a user message, which every template can show.
    """
    names = {c.id: c.function.name for m in messages for c in (m.tool_calls or [])}
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            calls = [(c.id, c.function.name, _arguments_object(c.function.arguments)) for c in m.tool_calls]
            if native_calls:
                d["tool_calls"] = [
                    {"id": cid, "type": "function", "function": {"name": n, "arguments": a}}
                    for cid, n, a in calls
                ]
            else:
                text = "\n".join(json.dumps({"name": n, "arguments": a}) for _, n, a in calls)
                d["content"] = f"{d['content']}\n{text}" if d["content"] else text
        elif m.role in ("tool", "function"):
            name = m.name or names.get(m.tool_call_id or "", "")
            if native_calls:
                d = {"role": "tool", "content": m.text(), "tool_call_id": m.tool_call_id}
                d["name"] = name or None
            else:
                label = f"the tool call {name}" if name else "a tool call"
                d = {"role": "user", "content": f"Result of {label}: {m.text()}"}
        out.append(d)
    return out


def _with_tools_system_message(messages: list[dict[str, Any]], tools: list[dict]) -> list[dict[str, Any]]:
    listing = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    text = f"{TOOLS_SYSTEM_PROMPT}\n\n{listing}"
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}".strip())
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# ---------------------------------------------------------------- reading calls back


def parse_tool_calls(text: str, names: list[str]) -> list[tuple[str, str]] | None:
    """[(name, arguments as a JSON string)] when the whole text is a call (or a list of calls), else None."""
    body = text.strip()
    for wrapper in (_WRAPPER, _FENCE):
        m = wrapper.match(body)
        if m:
            body = m.group(1)
    if not body.startswith(("{", "[")):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append((item["name"], json.dumps(args, ensure_ascii=False)))
    return calls or None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: str, index: int | None = None) -> dict:
    """One call as OpenAI writes it in a message (no index) or in a stream chunk (with its index)."""
    call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


@dataclass
class StreamPiece:
    """One delta of a choice: text, or tool-call fragments (OpenAI's chunk shape), and maybe its finish."""

    text: str | None = None
    tool_calls: list[dict] | None = None
    finish_reason: str | None = None


class ToolCallStream:
    """Turns one choice's text deltas into content or tool_calls deltas, per the plan's tool mode."""

    _HEAD = re.compile(r'^\s*\{"name": "([A-Za-z0-9_-]+)", "arguments": ')

    def __init__(self, plan: ChatPlan) -> None:
        self.plan = plan
        self.buffer = ""
        self.holding: bool | None = None if plan.mode == "auto" else plan.mode == "forced"
        self.streamed = 0  # forced: how much of the buffer has gone out as argument text
        self.head: re.Match | None = None

    def push(self, text: str, finish_reason: str | None) -> list[StreamPiece]:
        if self.plan.mode == "none":
            return [StreamPiece(text, None, finish_reason)] if text or finish_reason else []
        self.buffer += text
        pieces: list[StreamPiece] = []
        if self.holding is None:  # auto: the first visible character decides
            stripped = self.buffer.lstrip()
            if stripped:
                self.holding = stripped[0] in "{[<`"
                if not self.holding:
                    pieces.append(StreamPiece(self.buffer))
                    self.buffer = ""
            if finish_reason is None:
                return pieces
        elif not self.holding:
            pieces.append(StreamPiece(text) if text else StreamPiece())
            self.buffer = ""
        elif self.plan.mode == "forced":
            pieces += self._forced_progress(final=finish_reason is not None)
        if finish_reason is not None:
            pieces += self._finish(finish_reason)
        return [p for p in pieces if p.text or p.tool_calls or p.finish_reason]

    def _forced_progress(self, final: bool) -> list[StreamPiece]:
        # The grammar writes `{"name": "<name>", "arguments": <args>}` exactly: stream <args> as it grows,
        # holding back one character, the closing brace of the call.
        out = []
        if self.head is None:
            self.head = self._HEAD.match(self.buffer)
            if self.head is None:
                return out
            self.call_id = new_call_id()
            out.append(StreamPiece(tool_calls=[{"index": 0, "id": self.call_id, "type": "function",
                                                "function": {"name": self.head.group(1), "arguments": ""}}]))
            self.streamed = self.head.end()
        end = len(self.buffer)
        if final and self.buffer.endswith("}"):
            end -= 1
        elif not final:
            end -= 1
        if end > self.streamed:
            out.append(StreamPiece(tool_calls=[{"index": 0, "id": None, "type": None,
                                                "function": {"arguments": self.buffer[self.streamed:end]}}]))
            self.streamed = end
        return out

    def _finish(self, finish_reason: str) -> list[StreamPiece]:
        if self.plan.mode == "forced" and self.head is not None:
            whole = parse_tool_calls(self.buffer, self.plan.tool_names) is not None
            return [StreamPiece(finish_reason="tool_calls" if whole else finish_reason)]
        if not self.holding:
            return [StreamPiece(finish_reason=finish_reason)]
        content, calls, reason = self.plan.shape(self.buffer, finish_reason)
        if calls is not None:
            return [StreamPiece(tool_calls=[{"index": i, **c}]) for i, c in enumerate(calls)] + [
                StreamPiece(finish_reason=reason)
            ]
        return [StreamPiece(content), StreamPiece(finish_reason=reason)]
