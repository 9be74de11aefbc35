"""Tools and response_format on local models: the prompt, the constraint, and tool calls in OpenAI's shape.

`plan_chat` turns a chat request into what the engine needs: the prompt, and the grammar the output follows.

The call format. A template that renders `tools` itself and writes calls as `<tool_call>` blocks (Qwen2.5,
Hermes-style templates) gets the `tagged` format, the one the model was trained on: each call is
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, several calls one after another, joined by a
newline. Any other template (SmolLM2's has no tools) gets the tools listed in a system message
(`prompts/tools_system.md`) and the `json` format: one call is the object `{"name": ..., "arguments": {...}}`,
several are a JSON list of such objects.

The grammar (unless the request sets `"constrained_decoding": false`, the baseline of bench/bfcl.py):
- response_format json_object / json_schema: any JSON object / JSON matching the schema;
- tool_choice "required", or a named function: one call (or, with parallel_tool_calls, one or more) of the
  allowed tools, each call's arguments matching that tool's parameters;
- tool_choice "auto" (the default when tools are given): text, or calls. Text is anything whose first visible
  character is not `<`, `{` or `[`; an answer that starts with one of them is a call, and from there on the
  grammar holds it to the call format, the tool names and their parameter schemas: once a call begins, it
  always parses and matches (given enough max_tokens; see engine/constrain.py on closing);
- tool_choice "none": tools are shown to the model, and its answer is always text.

Reading calls back (`parse_tool_calls`, for constrained and free output alike): every `<tool_call>` block in
the answer is a call and the text around them is content; without blocks, the whole answer (after trimming
an optional ```json fence) must parse as one call, a list of calls or one call per line. "parameters" is
read as "arguments" (Llama 3 templates write it). Anything else is the assistant's text.

`ToolCallStream` turns a choice's streamed text into OpenAI's chunk deltas. Under the grammar, the shape of
a call is known, so each call's name goes out as soon as it is written and its arguments as they grow. Free
output under "auto" is held back from the first `{`, `[`, `<` or backtick that opens the answer, then sent as
tool calls or text when it ends.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from importlib import resources
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
CallFormat = Literal["tagged", "json"]
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_FENCE = re.compile(r"^```[A-Za-z]*\s*(.*?)\s*```$", re.DOTALL)
TAGS = ("<tool_call>", "</tool_call>")
ARGS_KEY = json.dumps('", "arguments": ')  # between a call's name and its arguments, as a Lark literal
# Under the auto grammar an answer is a call when it opens with one of these, or with a markdown fence (of any
# language: models write ```json, ```xml, ...) whose first line opens with one of them.
CALL_OPENERS = "<{["
_FENCE_HEAD = re.compile(r"```[A-Za-z]*(?:\n(?:[ \t]*([<{\[]))?)?")
TOOLS_SYSTEM_PROMPT = resources.files("fleetlm.serve").joinpath("prompts/tools_system.md").read_text().strip()


class ToolError(FleetError):
    """A tools / tool_choice / response_format combination the request cannot have (a 400 for the client)."""


@dataclass
class ChatPlan:
    """What a chat request becomes on a local model."""

    messages: list[dict[str, Any]]  # for the chat template
    prompt_ids: list[int] | None = None  # the rendered prompt (plan_chat always renders it)
    grammar: Grammar | None = None  # the output must follow it (response_format, tool calls)
    mode: ToolMode = "none"
    tool_names: list[str] = field(default_factory=list)
    call_format: CallFormat = "json"
    calls_constrained: bool = False  # the grammar holds tool calls to their format (streamed as they grow)
    text_grammar: Grammar | None = None  # auto: the answer asked for when the model called an undeclared tool

    def undeclared_call(self, text: str) -> bool:
        """The answer (under the auto grammar) calls a tool that was not declared: ask again for text."""
        if self.text_grammar is None or opens_call(text) is not True:
            return False
        return any(name not in self.tool_names for name in _CALL_NAME.findall(text))

    def shape(self, text: str, finish_reason: str) -> tuple[str | None, list[dict] | None, str]:
        """(content, tool_calls, finish_reason) of a finished choice, in OpenAI's shape."""
        if self.mode == "none" or (self.calls_constrained and opens_call(text) is False):
            return text, None, finish_reason  # under the grammar, an answer not opened as a call is text
        parsed = parse_tool_calls(text, self.tool_names)
        if parsed is None:
            return text, None, finish_reason
        content, calls = parsed
        return content, [tool_call(name, args) for name, args in calls], "tool_calls"


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
    source = _template_source(tokenizer, bool(tools))
    native = bool(re.search(r"\btools\b", source))
    call_format: CallFormat = "tagged" if native and "<tool_call>" in source else "json"
    messages = template_messages(req.messages, native_calls="tool_calls" in source)
    plan = ChatPlan(messages, mode=mode if tools else "none", tool_names=names, call_format=call_format)
    response_schema = _response_schema(req)  # validated even when unconstrained
    if req.constrained_decoding and plan.mode in ("forced", "auto"):
        allowed = [t for t in tools if t.function.name in chosen]
        auto = plan.mode == "auto"
        plan.grammar = tool_call_grammar(allowed, call_format, parallel=req.parallel_tool_calls is not False,
                                         text=auto, response_schema=response_schema if auto else None,
                                         tag_ids=_tag_ids(tokenizer) if call_format == "tagged" else None)
        plan.calls_constrained = True
        if auto and response_schema is None:
            plan.text_grammar = text_grammar(call_format)
    elif req.constrained_decoding:
        plan.grammar = _response_grammar(req, response_schema)
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


def _response_schema(req: ChatCompletionRequest) -> dict | None:
    """The JSON Schema that response_format asks the content to match; None for free text."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    spec = fmt.json_schema
    if not isinstance(spec, dict):
        raise ToolError('response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}')
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise ToolError("response_format json_schema: schema must be an object")
    return schema


def _response_grammar(req: ChatCompletionRequest, schema: dict | None) -> Grammar | None:
    """The grammar of response_format, given its schema (`_response_schema`, read once per request)."""
    if schema is None:
        return None
    if req.response_format is not None and req.response_format.type == "json_object":
        return json_object_grammar()
    return json_schema_grammar(schema)


def tool_call_grammar(tools: list[Tool], call_format: CallFormat = "json", *, parallel: bool = False,
                      text: bool = False, response_schema: dict | None = None,
                      tag_ids: tuple[int, int] | None = None) -> Grammar:
    """Calls of `tools` in `call_format` (one, or with `parallel` one or more); with `text`, or else text.

    The alternative to calls is free text that does not open like a call, or, when response_format asks for
    JSON (`response_schema`), that JSON. `tag_ids`: the token ids of `<tool_call>` and `</tool_call>` where
    the vocabulary has them as single (special) tokens, which the model writes rather than spelling the tag.
    """
    rules = []
    names = [f"name_{i}" for i in range(len(tools))]
    for rule, tool in zip(names, tools, strict=True):
        params = tool.function.parameters or {"type": "object", "properties": {}}
        rules.append(f"{rule}: {json.dumps(tool.function.name)} {ARGS_KEY} {lark_json(params)} \"}}\"")
    # Under auto, a model that reaches for a tool it was not given may write its name (any arguments): the
    # backend then asks it again for text (`undeclared_call`), instead of forcing a wrong call of a real tool.
    undeclared = text and response_schema is None
    if undeclared:
        declared = "|".join(re.escape(t.function.name) for t in tools)
        rules.append(f'other: OTHER {ARGS_KEY} %json {{"type": "object"}} "}}"')
        rules.append(f"OTHER: /[A-Za-z0-9_.\\- ]{{1,64}}/ & ~/({declared})/")
        names.append("other")
    rules.append('call: "{\\"name\\": \\"" (' + " | ".join(names) + ")")
    rules.append('listed: call | "[" call (", " call)* "]"' if parallel else "listed: call")
    if call_format == "tagged":
        for rule, tag, token in zip(("tag_open", "tag_close"), TAGS, tag_ids or (None, None), strict=True):
            rules.append(f"{rule}: {json.dumps(tag)}" + (f" | <[{token}]>" if token is not None else ""))
        rules.append('tagged: tag_open "\\n" call "\\n" tag_close')
        rules.append('bare: tagged ("\\n" tagged)*' if parallel else "bare: tagged")
    else:
        rules.append("bare: listed")
    # Models also fence their calls in markdown; a fenced call is held to the grammar like a bare one.
    if text:  # auto: a model that fences its call is held to the grammar (forced calls need no fence)
        rules.append('calls: bare | FENCE_OPEN listed "\\n```"')
        rules.append(r"FENCE_OPEN: /```[A-Za-z]{0,12}\n/")  # a language tag, never an endless one
    else:
        rules.append("calls: bare")
    # Calls may open with a few blanks (models often start with a newline), never an endless run of them.
    rules.append(r"LEAD: /[ \t\n]{1,3}/")
    if not text:
        start = "start: LEAD? calls"
    elif response_schema is not None and call_format == "tagged":
        start = f"start: LEAD? calls | answer\nanswer: {lark_json(response_schema)}"
    elif response_schema is not None:
        # A literal call head beside a %json answer that also opens with `{"` defeats llguidance's lexer, so
        # the answer and a call are one JSON Schema here (and calls come one at a time).
        as_schema = [{"type": "object", "required": ["name", "arguments"],
                      "properties": {"name": {"const": t.function.name},  # name first, as calls are written
                                     "arguments": t.function.parameters or {"type": "object"}}}
                     for t in tools]
        start = f"start: LEAD? answer\nanswer: {lark_json({'anyOf': [response_schema, *as_schema]})}"
    else:
        start = "start: (LEAD? calls | TEXT)?\n" + _text_rule(call_format)
    return lark_grammar(start + "\n" + "\n".join(rules) + "\n")


def _text_rule(call_format: CallFormat) -> str:
    # Text: not blank, not opening like a call, and (tagged) with no call tag further on, so that a call is
    # never written half inside the text where the grammar could not hold it.
    no_tag = r" & ~/[\s\S]*<tool_call>[\s\S]*/" if call_format == "tagged" else ""
    return r"TEXT: /[ \t\n]*[^ \t\n][\s\S]*/ & ~/[ \t\n]*([<{\[]|```[A-Za-z]*\n[ \t]*[<{\[])[\s\S]*/" + no_tag


def text_grammar(call_format: CallFormat) -> Grammar:
    """Prose, asked of a model that called an undeclared tool: it opens with a letter or a digit, so that the
    model cannot spell its call again as JSON, a fence or a tag (and holds no call tag further on)."""
    no_tag = r" & ~/[\s\S]*<tool_call>[\s\S]*/" if call_format == "tagged" else ""
    return lark_grammar("start: PROSE\n" + r"PROSE: /[ \t\n]*[A-Za-z0-9][\s\S]*/" + no_tag + "\n")


def _tag_ids(tokenizer: Any) -> tuple[int, int] | None:
    """The ids of `<tool_call>` and `</tool_call>` when the vocabulary has each as one token."""
    ids = []
    for tag in TAGS:
        token = tokenizer.token_id(tag) if hasattr(tokenizer, "token_id") else None
        if token is None:
            return None
        ids.append(int(token))
    return ids[0], ids[1]


def opens_call(text: str) -> bool | None:
    """Whether an answer opens like a call (the auto grammar's rule); None while it is too short to tell."""
    head = text.lstrip()
    if not head:
        return None
    if head[0] in CALL_OPENERS:
        return True
    if not head.startswith("```"):
        return False if not "```".startswith(head) else None
    fence = _FENCE_HEAD.match(head)
    assert fence is not None
    if fence.group(1):
        return True  # a fence whose first line opens a call
    return None if fence.end() == len(head) else False


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


def parse_tool_calls(text: str, names: list[str]) -> tuple[str | None, list[tuple[str, str]]] | None:
    """(content, [(name, arguments as a JSON string)]) when the answer holds calls, else None (it is text).

    `<tool_call>` blocks may sit anywhere, the text around them is the content; without blocks, the whole
    answer must be calls (a call, a list of calls, or one call per line) and the content is None.
    """
    if "<tool_call>" in text:
        calls: list[tuple[str, str]] = []
        for block in _BLOCK.findall(text):
            found = _calls_in(block, names)
            if found is None:
                return None
            calls += found
        rest = _BLOCK.sub("", text).strip()
        if not calls or "<tool_call>" in rest or "</tool_call>" in rest:  # an unclosed or stray tag
            return None
        return rest or None, calls
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    found = _calls_in(body, names)
    if found is None and "\n" in body:  # one call per line
        per_line = [_calls_in(line, names) for line in body.splitlines() if line.strip()]
        if per_line and all(c is not None for c in per_line):
            found = [c for cs in per_line for c in cs]  # type: ignore[union-attr]
    return (None, found) if found else None


def _calls_in(body: str, names: list[str]) -> list[tuple[str, str]] | None:
    """The calls a JSON text holds (one object or a list of them), or None if it is not exactly that."""
    body = body.strip()
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


# ---------------------------------------------------------------- streaming


@dataclass
class StreamPiece:
    """One delta of a choice: text, or tool-call fragments (OpenAI's chunk shape), and maybe its finish."""

    text: str | None = None
    tool_calls: list[dict] | None = None
    finish_reason: str | None = None


# Where a call starts in constrained output: after blanks, a list's "[" or ", ", the newline between tagged
# calls, or a fence; then the tag (tagged format) and the call's fixed head.
_CALL_HEAD = re.compile(
    r'[ \t\n\[,]*(?:```[A-Za-z]*\n\[?)?(?:<tool_call>\n)?\{"name": "([^"]+)", "arguments": ')
_CALL_NAME = re.compile(r'\{"name": "([^"]*)", "arguments": ')
_CALL_TAIL = re.compile(r"\}(?:\n</tool_call>)?")


def _json_value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array that opens at `start`, or None if it is not closed yet."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class ToolCallStream:
    """Turns one choice's text deltas into content or tool_calls deltas, per the plan's tool mode."""

    def __init__(self, plan: ChatPlan) -> None:
        self.plan = plan
        self.buffer = ""
        # "calls": constrained calls, streamed as they grow; "held": free output kept until it ends;
        # "text": content, passed through; None: auto, not decided before the first visible character.
        self.state: str | None = None
        if plan.mode == "forced":
            self.state = "calls" if plan.calls_constrained else "held"
        self.ids: list[str] = []  # the calls whose name went out
        self.sent: list[int] = []  # how much of each call's arguments went out
        # a call of a tool the request did not declare: nothing more goes out; the backend asks again for
        # text (one choice), or the answer ends as text (several)
        self.undeclared = False

    def push(self, text: str, finish_reason: str | None) -> list[StreamPiece]:
        if self.plan.mode == "none":
            return [StreamPiece(text, None, finish_reason)] if text or finish_reason else []
        if self.undeclared:
            self.buffer += text
            return self._finish_undeclared(finish_reason)
        pieces: list[StreamPiece] = []
        if self.state == "text":
            pieces.append(StreamPiece(text))
        else:
            self.buffer += text
        if self.state is None:  # auto: how the answer opens decides
            if self.plan.calls_constrained:
                call = opens_call(self.buffer)
            else:  # free output: hold anything that might be JSON or a tag, decide at the end
                stripped = self.buffer.lstrip()
                call = (stripped[0] in "<{[`") if stripped else None
            if call is not None:
                self.state = ("calls" if self.plan.calls_constrained else "held") if call else "text"
            if self.state == "text":
                pieces.append(StreamPiece(self.buffer))
                self.buffer = ""
        if self.state == "calls":
            pieces += self._progress()
        if finish_reason is not None:
            pieces += self._finish(finish_reason)
        return [p for p in pieces if p.text or p.tool_calls or p.finish_reason]

    def _finish_undeclared(self, finish_reason: str | None) -> list[StreamPiece]:
        # several choices: this one is not asked again, its answer ends as the text it is
        return [StreamPiece(self.buffer), StreamPiece(finish_reason=finish_reason)] if finish_reason else []

    def _progress(self) -> list[StreamPiece]:
        # The grammar writes each call's head exactly, so the name and each argument byte are known as they
        # arrive: send new heads, then the arguments' new text.
        out: list[StreamPiece] = []
        pos, index = 0, 0
        while True:
            head = _CALL_HEAD.match(self.buffer, pos)
            if head is None:
                break
            if head.group(1) not in self.plan.tool_names:  # a tool the request did not declare
                self.undeclared = not self.ids and self.plan.text_grammar is not None
                break
            if index == len(self.ids):
                self.ids.append(new_call_id())
                self.sent.append(0)
                out.append(StreamPiece(tool_calls=[{"index": index, "id": self.ids[index], "type": "function",
                                                    "function": {"name": head.group(1), "arguments": ""}}]))
            start = head.end()
            end = _json_value_end(self.buffer, start)
            upto = len(self.buffer) if end is None else end
            if upto - start > self.sent[index]:
                fragment = self.buffer[start + self.sent[index]:upto]
                self.sent[index] = upto - start
                out.append(StreamPiece(tool_calls=[{"index": index, "function": {"arguments": fragment}}]))
            tail = _CALL_TAIL.match(self.buffer, end) if end is not None else None
            if tail is None:
                break
            pos, index = tail.end(), index + 1
        return out

    def _finish(self, finish_reason: str) -> list[StreamPiece]:
        if self.state == "text":
            return [StreamPiece(finish_reason=finish_reason)]
        if self.state == "calls":
            whole = parse_tool_calls(self.buffer, self.plan.tool_names) is not None
            return [StreamPiece(finish_reason="tool_calls" if whole and self.ids else finish_reason)]
        content, calls, reason = self.plan.shape(self.buffer, finish_reason)
        pieces = [StreamPiece(content)]
        if calls is not None:
            pieces += [StreamPiece(tool_calls=[{"index": i, **c}]) for i, c in enumerate(calls)]
        return pieces + [StreamPiece(finish_reason=reason)]
