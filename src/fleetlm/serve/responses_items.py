"""The Responses API's items and tools, and how they map onto the chat path the gateway already serves.

Input items (`message`, `function_call`, `function_call_output`) become chat messages: a function_call is an
assistant `tool_calls` entry (consecutive calls, and the assistant text just before them, make one message),
its output a `tool` message with the same `call_id`. Every stored item has an id of its own (`msg_...`,
`fc_...`, `fco_...`, or the one the client sent), kept with it so input_items lists are stable.

Tools: `function` tools become chat function tools (the chat path's constrained decoding then holds the
calls to their schemas); `mcp` tools (servers fleet.yaml names) are the chat path's mcp entries, whose calls
the gateway runs (serve/mcp_tools.py) and which come back as `mcp_list_tools` / `mcp_call` items;
`file_search` stays ours (responses_api.py). `tool_choice` is mapped as described
in `plan_tools`, and `text.format` becomes the chat request's response_format (`text_format`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fleetlm.rag.store import new_id
from fleetlm.serve.errors import BadRequest

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text")
DETAILS = ("auto", "low", "high")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


# ------------------------------------------------------------------ input items


def text_of(content: Any, param: str) -> str:
    """A content's text (image parts left out)."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in _parts(content, param) if p["type"] != "input_image")


def _parts(content: Any, param: str) -> list[dict]:
    """Content parts, checked: text parts, and input_image parts (an https or data: URL, or the file_id of
    an upload), which the gateway's vision stage reads for models that cannot see (serve/vision.py)."""
    if not isinstance(content, list):
        raise BadRequest("content must be a string or a list of parts", param=param)
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            if not isinstance(part.get("text", ""), str):
                raise BadRequest("a text part's text must be a string", param=f"{param}[{i}].text")
            parts.append({"type": kind, "text": part.get("text", "")})
        elif kind == "input_image":
            url, file_id, detail = part.get("image_url"), part.get("file_id"), part.get("detail", "auto")
            if not (isinstance(url, str) and url) and not (isinstance(file_id, str) and file_id):
                raise BadRequest("an input_image part needs image_url (a URL) or file_id",
                                 param=f"{param}[{i}].image_url")
            if detail not in DETAILS:
                raise BadRequest("detail must be auto, low or high", param=f"{param}[{i}].detail")
            source = {"image_url": url} if isinstance(url, str) and url else {"file_id": file_id}
            parts.append({"type": "input_image", **source, "detail": detail})
        else:
            raise BadRequest("content parts must be input_text, output_text or input_image",
                             param=f"{param}[{i}].type")
    return parts


def _chat_content(content: Any) -> str | list[dict]:
    """A stored message's content for the chat request: its text, or chat parts when it holds images."""
    if isinstance(content, str):
        return content
    if not any(p["type"] == "input_image" for p in content):
        return text_of(content, "input")
    out: list[dict] = []
    for p in content:
        if p["type"] != "input_image":
            out.append({"type": "text", "text": p.get("text", "")})
        elif "image_url" in p:
            out.append({"type": "image_url", "image_url": {"url": p["image_url"], "detail": p["detail"]}})
        else:
            out.append({"type": "file", "file": {"file_id": p["file_id"]}})
    return out


def _string(item: dict, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (key != "arguments" and not value):
        raise BadRequest(f"{key} must be a {'' if key == 'arguments' else 'non-empty '}string",
                         param=f"{param}.{key}")
    return value


def _item_id(item: dict, prefix: str) -> str:
    given = item.get("id")
    return given if isinstance(given, str) and given else new_id(prefix)


def message_item(role: str, text: str, item_id: str | None = None) -> dict:
    part = "output_text" if role == "assistant" else "input_text"
    content: dict[str, Any] = {"type": part, "text": text}
    if role == "assistant":
        content["annotations"] = []
    return {"id": item_id or new_id("msg"), "type": "message", "role": role, "status": "completed",
            "content": [content]}


def _message(item: dict, param: str) -> dict:
    """A message input item as stored: its text joined into one part, or, with images, its parts in order."""
    content, role = item.get("content"), item["role"]
    if isinstance(content, str):
        return message_item(role, content, _item_id(item, "msg"))
    parts = _parts(content, f"{param}.content")
    if not any(p["type"] == "input_image" for p in parts):
        return message_item(role, text_of(parts, f"{param}.content"), _item_id(item, "msg"))
    if role != "user":
        raise BadRequest("only user messages may carry images", param=f"{param}.content")
    kept = [p if p["type"] == "input_image" else {"type": "input_text", "text": p["text"]} for p in parts]
    return {"id": _item_id(item, "msg"), "type": "message", "role": role, "status": "completed",
            "content": kept}


def normalise_input(value: str | list[Any], known_calls: set[str]) -> list[dict]:
    """The request's input as stored items, each with its id; `known_calls` holds the call_ids of the
    chain's earlier function calls, so that a function_call_output naming none of them is a 400."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRequest("input must not be empty", param="input")
        return [message_item("user", value)]
    if not value:
        raise BadRequest("input must not be empty", param="input")
    calls = set(known_calls)
    items = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest("an input item must be an object", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ROLES:
                raise BadRequest(f"role must be one of {', '.join(ROLES)}", param=f"{param}.role")
            items.append(_message(item, param))
        elif kind == "function_call":
            call_id = _string(item, "call_id", param)
            calls.add(call_id)
            items.append({"id": _item_id(item, "fc"), "type": "function_call", "status": "completed",
                          "call_id": call_id, "name": _string(item, "name", param),
                          "arguments": _string(item, "arguments", param)})
        elif kind in ("mcp_call", "mcp_list_tools"):  # a client sending our output items back
            if not isinstance(item.get("server_label"), str):
                raise BadRequest("server_label must be a string", param=f"{param}.server_label")
            if kind == "mcp_call":
                _string(item, "name", param)
                _string(item, "arguments", param)
            items.append({**item, "id": _item_id(item, "mcp")})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", param)
            if call_id not in calls:
                raise BadRequest(f"no function call with call_id {call_id!r} in this input or the previous "
                                 "response's chain", param=f"{param}.call_id")
            output = item.get("output")
            output = output if isinstance(output, str) else text_of(output, f"{param}.output")
            items.append({"id": _item_id(item, "fco"), "type": "function_call_output", "status": "completed",
                          "call_id": call_id, "output": output})
        else:
            raise BadRequest(f"unsupported input item type {kind!r}", param=f"{param}.type")
    return items


def call_ids(items: list[dict]) -> set[str]:
    return {i["call_id"] for i in items if i.get("type") == "function_call"}


def to_messages(items: list[dict]) -> list[dict]:
    """Stored items (input and output) as chat messages, oldest first."""
    messages: list[dict] = []
    after_assistant = False  # the item before was an assistant message or call: a call joins its message
    for item in items:
        kind = item.get("type")
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _chat_content(item["content"])})
            after_assistant = role == "assistant"
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if after_assistant:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            after_assistant = True
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
            after_assistant = False
        elif kind == "mcp_call":  # the call the gateway ran, and its result, as the model saw them
            call = {"id": item["id"], "type": "function", "function": {
                "name": f"{item['server_label']}__{item['name']}", "arguments": item["arguments"]}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            result = item.get("output") if item.get("error") is None else f"error: {item['error']}"
            messages.append({"role": "tool", "tool_call_id": item["id"], "content": str(result or "")})
            after_assistant = False
    return messages


# ------------------------------------------------------------------ tools and tool_choice


@dataclass
class ToolPlan:
    """What a request's tools and tool_choice become."""

    search: dict | None = None  # the file_search tool's options, when it runs
    functions: list[dict] = field(default_factory=list)  # chat function tools
    mcp: list[dict] = field(default_factory=list)  # chat mcp entries (serve/mcp_tools.py runs their calls)
    chat_choice: Any = None  # the chat request's tool_choice (None: no function tools)


def _file_search(tool: dict, param: str) -> dict:
    from fleetlm.rag.filters import compile_filter
    from fleetlm.rag.rerank import OPENAI_RANKERS, fleet_ranker

    ids = tool.get("vector_store_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(x, str) for x in ids):
        raise BadRequest("vector_store_ids must be a non-empty list of ids",
                         param=f"{param}.vector_store_ids")
    limit = tool.get("max_num_results", 10)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 50:
        raise BadRequest("max_num_results must be between 1 and 50", param=f"{param}.max_num_results")
    if tool.get("filters") is not None:
        try:
            compile_filter(tool["filters"], "a")
        except Exception as exc:
            raise BadRequest(f"bad filters: {exc}", param=f"{param}.filters") from None
    ranking = tool.get("ranking_options") or {}
    threshold = ranking.get("score_threshold", 0.0) if isinstance(ranking, dict) else None
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        raise BadRequest("score_threshold must be between 0 and 1",
                         param=f"{param}.ranking_options.score_threshold")
    ranker = ranking.get("ranker")
    if ranker is not None and ranker not in OPENAI_RANKERS and not fleet_ranker(ranker):
        raise BadRequest(f"ranker must be one of {', '.join(sorted(OPENAI_RANKERS))}, or fleet:<model>",
                         param=f"{param}.ranking_options.ranker")
    return {"vector_store_ids": ids, "max_num_results": limit, "filters": tool.get("filters"),
            "score_threshold": float(threshold), "ranker": fleet_ranker(ranker)}


def _function(tool: dict, param: str) -> dict:
    name = tool.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest("a function tool needs a name of letters, digits, _ and - (at most 64)",
                         param=f"{param}.name")
    for key, kind in (("description", str), ("parameters", dict), ("strict", bool)):
        if tool.get(key) is not None and not isinstance(tool[key], kind):
            raise BadRequest(f"{key} must be a {kind.__name__ if kind is not dict else 'JSON object'}",
                             param=f"{param}.{key}")
    keys = ("name", "description", "parameters", "strict")
    function = {k: tool[k] for k in keys if tool.get(k) is not None}
    return {"type": "function", "function": function}


def plan_tools(tools: list[Any] | None, choice: Any) -> ToolPlan:
    """Validate tools and tool_choice (a 400 naming the field), and map them:

    - `auto` (the default): file_search runs, the model may call functions;
    - `none`: no file_search, and the model answers in text (the functions are still shown to it);
    - `required`: the model must call a function (file_search alone satisfies it when there is none);
    - `{type: function, name}`: that function, forced; `{type: file_search}`: file_search, no functions.
    """
    plan = ToolPlan()
    names: list[str] = []
    for i, tool in enumerate(tools or []):
        param = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "file_search":
            if plan.search is not None:
                raise BadRequest("at most one file_search tool", param=f"{param}.type")
            plan.search = _file_search(tool, param)
        elif kind == "mcp":
            plan.mcp.append(_mcp(tool, param))
        elif kind == "function":
            plan.functions.append(_function(tool, param))
            names.append(tool["name"])
            if names.count(tool["name"]) > 1:
                raise BadRequest(f"function names must be unique: {tool['name']!r} twice",
                                 param=f"{param}.name")
        else:
            raise BadRequest(f"unsupported tool type {kind!r} (function, mcp and file_search are supported)",
                             param=f"{param}.type")
    if choice is None or choice == "auto":
        plan.chat_choice = "auto"
    elif choice == "none":
        plan.search, plan.chat_choice = None, "none"
    elif choice == "required":
        if not names and not plan.mcp and plan.search is None:
            raise BadRequest("tool_choice 'required' needs at least one tool", param="tool_choice")
        plan.chat_choice = "required" if names or plan.mcp else None
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if name not in names:
            raise BadRequest(f"tool_choice names {name!r}, which is not one of the function tools",
                             param="tool_choice.name")
        plan.chat_choice = {"type": "function", "function": {"name": name}}
    elif isinstance(choice, dict) and choice.get("type") == "file_search":
        if plan.search is None:
            raise BadRequest("tool_choice file_search needs a file_search tool", param="tool_choice.type")
        plan.chat_choice = "none"
    else:
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise BadRequest(f"unsupported tool_choice {kind!r}", param="tool_choice.type"
                         if isinstance(choice, dict) else "tool_choice")
    if not plan.functions and not plan.mcp:
        plan.chat_choice = None
    return plan


def _mcp(tool: dict, param: str) -> dict:
    """An mcp tool, checked as the chat path checks its mcp entries (a 400 naming the field)."""
    from pydantic import ValidationError

    from fleetlm.serve.protocol import McpServerTool

    try:
        McpServerTool.model_validate(tool)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BadRequest(f"{where}: {err['msg'].removeprefix('Value error, ')}",
                         param=f"{param}.{where}" if where else param) from None
    return tool


def text_format(text: dict | None) -> dict | None:
    """`text.format` as the chat request's response_format (None: free text); a 400 naming what is wrong."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise BadRequest("text.format.type must be text, json_object or json_schema",
                         param="text.format.type")
    if not isinstance(fmt.get("name"), str) or not fmt["name"]:
        raise BadRequest("a json_schema format needs a name", param="text.format.name")
    if not isinstance(fmt.get("schema"), dict):
        raise BadRequest("a json_schema format needs a schema object", param="text.format.schema")
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
    return {"type": "json_schema", "json_schema": spec}


# ------------------------------------------------------------------ output items


def function_call_item(call: dict, status: str = "completed") -> dict:
    """A chat tool call (`{"id", "function": {"name", "arguments"}}`) as a function_call output item."""
    function = call.get("function") or {}
    return {"id": new_id("fc"), "type": "function_call", "status": status, "call_id": call.get("id") or
            new_id("call"), "name": function.get("name", ""), "arguments": function.get("arguments", "")}


def mcp_items(run: Any) -> list[dict]:
    """What a request's MCP tool loop did (serve/mcp_tools.McpRun), as OpenAI's output items: one
    `mcp_list_tools` per server (the tools the request allowed), then one `mcp_call` per call that ran."""
    items = []
    for server in sorted(run.servers):
        tools = [{"name": t.tool, "description": t.description, "input_schema": t.parameters,
                  "annotations": None} for t in run.tools.values() if t.server == server]
        items.append({"id": new_id("mcpl"), "type": "mcp_list_tools", "server_label": server, "tools": tools,
                      "error": None})
    for entry in run.calls:
        known = run.tools.get(entry["name"])
        server, _, tool = (known.server, "", known.tool) if known else entry["name"].partition("__")
        items.append({"id": new_id("mcp"), "type": "mcp_call", "server_label": server, "name": tool,
                      "arguments": entry["arguments"], "output": entry.get("output"),
                      "error": entry.get("error"), "status": "failed" if "error" in entry else "completed"})
    return items


def output_message(text: str, annotations: list[dict], status: str = "completed",
                   item_id: str | None = None) -> dict:
    return {"id": item_id or new_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": annotations}]}
