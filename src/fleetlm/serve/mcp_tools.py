"""MCP tools in the gateway: a chat request's `{"type": "mcp"}` tools entries become their servers' function
tools, and the model's calls of them are run here, round after round, until it answers (the tool loop).

`prepare` checks the entries (a server fleet.yaml does not name, n > 1, a name clash: 400), lists the named
servers' tools through the gateway's one `AsyncMcpToolbox` (a server that cannot be started or listed: 424,
as OpenAI's Responses API answers a failed MCP tool listing) and swaps the entries for those tools
(`<server>__<tool>`, filtered by `allowed_tools`), so that no backend ever sees an mcp entry.

The loop (`whole_rounds`, `stream_rounds`): the model chain the request resolved to (by name, or the router's
choice for a virtual model; cascades are not climbed) answers; when every tool call of its answer names one
of this request's MCP tools, the calls run concurrently, the assistant message and one `role: tool` message
per call (an MCP failure as the text "error: ...", so that the model can recover) are appended, and the model
is asked again, at most MAX_ROUNDS times, then once more with tool_choice "none". Any other answer (text,
calls of the client's own functions, or a mix of those with MCP calls) goes back to the client as it is.
Each round is a row of the usage log under the request's id; the response's usage and cost are the sums
over the rounds, its message carries `fleet_mcp_calls` (what ran), the `x-fleet-mcp-calls` header counts
the calls.

Streaming: each round is streamed from the backend and read until its first tool call or text decides what
it is; a round of tool calls is read to its end and never sent, an answer is passed on to the client as it
comes (so an answer that begins with text and then calls MCP tools reaches the client as it is).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from fleetlm.mcp.client import McpTool
from fleetlm.mcp.errors import McpConnectError, McpDisconnectedError, McpError
from fleetlm.serve.backends import Choice, Delta, Generation, close_stream
from fleetlm.serve.errors import APIError, BadRequest
from fleetlm.serve.limits import prompt_token_bound
from fleetlm.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    McpServerTool,
    Tool,
    ToolCall,
)

log = logging.getLogger(__name__)

MAX_ROUNDS = 8  # rounds of MCP calls per request; then one last answer without tools (tool_choice "none")


class McpUnavailable(APIError):
    """A server the request names could not be started or listed: 424 Failed Dependency, OpenAI's status for a
    failed MCP tool listing (the server is a dependency of the request, not the gateway's own failure)."""

    status, type, code = 424, "external_connector_error", "mcp_list_tools_failed"


def requested(req: Any) -> bool:
    """Whether a parsed request has `{"type": "mcp"}` tools entries."""
    tools = req.tools if isinstance(req, ChatCompletionRequest) else None
    return any(isinstance(t, McpServerTool) for t in tools or [])


@dataclass
class McpRun:
    """One request's MCP tools and what its tool loop did: the calls, the rounds and what they cost."""

    tools: dict[str, McpTool]  # this request's MCP tools by exposed name (<server>__<tool>)
    servers: frozenset[str]
    client_names: frozenset[str]  # the client's own function tools
    calls: list[dict] = field(default_factory=list)  # fleet_mcp_calls: {name, arguments, output | error}
    rounds: int = 0
    prompt_tokens: int = 0  # summed over the rounds of tool calls (the final answer not included)
    completion_tokens: int = 0
    cost_usd: float = 0.0
    limit_reached: bool = False

    def owns(self, name: Any) -> bool:
        """A call the gateway runs: one of this request's MCP tools, or a name of one of its servers that the
        client does not define (a tool left out by allowed_tools, or made up: the model gets an error)."""
        if not isinstance(name, str):
            return False
        if name in self.tools:
            return True
        server, sep, _ = name.partition("__")
        return bool(sep) and server in self.servers and name not in self.client_names

    def claims(self, choice: Choice | None) -> bool:
        """Whether an answer is a round of MCP calls: it calls tools, and every one is an MCP tool."""
        calls = choice.tool_calls if choice is not None else None
        return bool(calls) and all(self.owns(_function(c).get("name")) for c in calls or [])

    def total(self, usage: tuple[int, int]) -> tuple[int, int]:
        """The final answer's usage plus the tool rounds'."""
        return usage[0] + self.prompt_tokens, usage[1] + self.completion_tokens

    def annotate(self, data: dict, cost: float) -> float:
        """A whole chat completion's body as the client gets it: usage summed over the rounds and the calls
        on the first message; returns the request's cost (the final answer's plus the rounds')."""
        usage = data.get("usage")
        if isinstance(usage, dict):
            pt, ct = self.total((usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)))
            usage.update(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct)
        for choice in data.get("choices") or []:
            if choice.get("index") == 0:
                choice["message"]["fleet_mcp_calls"] = self.calls
        return cost + self.cost_usd

    def summary(self) -> str:
        calls = f"{len(self.calls)} call{'s' if len(self.calls) != 1 else ''}"
        rounds = f"{self.rounds} round{'s' if self.rounds != 1 else ''}"
        limit = f"; round limit {MAX_ROUNDS} reached" if self.limit_reached else ""
        return f"mcp: {calls} in {rounds}{limit}"


def _function(call: Any) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    return fn if isinstance(fn, dict) else {}


# ------------------------------------------------------------------------------------------------ the tools


async def prepare(gw: Any, req: ChatCompletionRequest, call: Any) -> ChatCompletionRequest:
    """The request with its mcp entries replaced by their servers' tools; sets `call.mcp`. BadRequest for
    what the client got wrong, McpUnavailable for a server that cannot be started or listed."""
    box = gw.mcp
    entries = [t for t in req.tools or [] if isinstance(t, McpServerTool)]
    functions = [t for t in req.tools or [] if isinstance(t, Tool)]
    if req.n != 1:  # the loop continues one conversation: it cannot follow several choices at once
        raise BadRequest("n must be 1 in a request with mcp tools", param="n")
    for entry in entries:
        if entry.server_label not in box.servers:
            configured = ", ".join(sorted(box.servers)) or "none are configured"
            raise BadRequest(f"tools: no MCP server named {entry.server_label!r} in this gateway's "
                             f"fleet.yaml (mcp_servers: {configured})", param="tools")
    allowed: dict[str, set[str] | None] = {}
    for entry in entries:  # one server named twice: the union of what the entries allow
        label, names = entry.server_label, entry.allowed_tools
        before = allowed.get(label, set())
        allowed[label] = None if names is None or before is None else before | set(names)
    labels = list(allowed)
    listed = await asyncio.gather(*(box.list_tools([label]) for label in labels), return_exceptions=True)
    for label, result in zip(labels, listed, strict=True):
        if isinstance(result, McpError):
            # The reason (its command line, the last lines of its stderr) is the operator's to read, not the
            # client's: it goes to the gateway's log.
            log.warning("MCP server %s: %s", label, result)
            raise McpUnavailable(f"Error retrieving tool list from MCP server: {label!r}: it could not be "
                                 "started or listed (the gateway's log has the reason)", param="tools")
        if isinstance(result, BaseException):
            raise result
    chosen = _allowed([t for tools in listed for t in tools], allowed)  # type: ignore[union-attr]
    client_names = {t.function.name for t in functions}
    clash = sorted(client_names & set(chosen))
    if clash:
        raise BadRequest(f"tools: function {clash[0]!r} has the name of an MCP tool of this request",
                         param="tools")
    call.mcp = McpRun(chosen, frozenset(allowed), frozenset(client_names))
    if call.plan is not None or call.cascade:  # every round is one model's; its answers are not checked
        call.plan, call.cascade = None, False
        call.route += " (cascade not climbed: mcp tools)"
    tools = [*functions, *(Tool.model_validate(t.openai()) for t in chosen.values())]
    return req.model_copy(update={"tools": tools or None})


def _allowed(listed: Iterable[McpTool], allowed: dict[str, set[str] | None]) -> dict[str, McpTool]:
    """The listed tools that `allowed` lets through, by exposed name; an allowed name no tool has is a 400."""
    listed = list(listed)
    chosen = {}
    for server, names in allowed.items():
        tools = [t for t in listed if t.server == server]
        if names is not None:
            known = {t.tool for t in tools} | {t.name for t in tools}
            missing = sorted(names - known)
            if missing:
                raise BadRequest(f"tools: MCP server {server} has no tool {missing[0]!r} (allowed_tools); "
                                 f"its tools are: {', '.join(sorted(t.tool for t in tools)) or 'none'}",
                                 param="tools")
        chosen.update({t.name: t for t in tools if names is None or t.tool in names or t.name in names})
    return chosen


# ------------------------------------------------------------------------------------------------ the loop


def _last_request(req: ChatCompletionRequest) -> ChatCompletionRequest:
    return req.model_copy(update={"tool_choice": "none"})


async def whole_rounds(
    gw: Any, req: ChatCompletionRequest, chain: list[str], call: Any
) -> tuple[ChatCompletionRequest, Generation]:
    """Rounds until the model answers: (the request of the final round, its answer)."""
    run: McpRun = call.mcp
    while True:
        last = run.rounds >= MAX_ROUNDS
        ask = _last_request(req) if last else req
        gen: Generation = await gw.first_success(chain, call, lambda b, ask=ask: b.chat(ask))
        choice = gen.choices[0] if gen.choices else None
        if last or not run.claims(choice):
            run.limit_reached = last
            return _finish(gw, call, ask), gen
        assert choice is not None
        req = await _round(gw, ask, chain, call, gen, choice)


async def stream_rounds(
    gw: Any, req: ChatCompletionRequest, chain: list[str], call: Any
) -> tuple[ChatCompletionRequest, AsyncIterator[Delta], Delta | None]:
    """Rounds until the model answers: (the request of the final round, its stream, the stream's first piece),
    as the gateway's first_success gives a stream (the answer's pieces already read come first)."""
    run: McpRun = call.mcp
    while True:
        last = run.rounds >= MAX_ROUNDS
        ask = _last_request(req) if last else req
        it, first = await gw.first_success(chain, call, lambda b, ask=ask: gw._open_stream(b, ask, True))
        if last:
            run.limit_reached = True
            return _finish(gw, call, ask), it, first
        pieces, calls = await _peek(it, first)
        if not calls:  # an answer: on to the client, live
            return _finish(gw, call, ask), _chained(pieces[1:], it), (pieces[0] if pieces else None)
        pieces += await _rest(it)
        gen = _assemble(pieces, ask)
        if not run.claims(gen.choices[0]):  # the client's own calls: passed on as the backend sent them
            return _finish(gw, call, ask), _chained(pieces[1:], None), pieces[0]
        req = await _round(gw, ask, chain, call, gen, gen.choices[0])


def _finish(gw: Any, call: Any, ask: ChatCompletionRequest) -> ChatCompletionRequest:
    call.route += f"; {call.mcp.summary()}"
    if gw.config.log_content:  # the final row logs the conversation its answer was given to
        call.prompt = _messages_json(ask)
    return ask


async def _round(gw: Any, ask: ChatCompletionRequest, chain: list[str], call: Any, gen: Generation,
                 choice: Choice) -> ChatCompletionRequest:
    """Log a round of MCP calls, run them, and return the request with the calls and their results."""
    run: McpRun = call.mcp
    run.rounds += 1
    calls = []
    for i, c in enumerate(choice.tool_calls or []):
        fn = _function(c)
        args = fn.get("arguments")
        args = args if isinstance(args, str) else json.dumps(args if args is not None else {})
        calls.append((c.get("id") or f"call_mcp_{run.rounds}_{i}", fn.get("name"), args))
    cost = await _log_round(gw, call, ask, gen, choice)
    run.prompt_tokens += gen.prompt_tokens
    run.completion_tokens += gen.completion_tokens
    run.cost_usd += cost
    # The next round is reserved against the key's budget like a request of its own, before the tools run:
    # a spent budget stops the loop here (429) rather than after work whose results no model would read.
    gw.reserve(ask, chain, call)
    results = await asyncio.gather(*(_run_call(gw.mcp, run, name, args) for _, name, args in calls))
    run.calls += [entry for entry, _ in results]
    assistant = ChatMessage(role="assistant", content=choice.text or None, tool_calls=[
        ToolCall(id=cid, type="function", function=FunctionCall(name=name, arguments=args))
        for cid, name, args in calls])
    answers = [ChatMessage(role="tool", tool_call_id=cid, content=text)
               for (cid, _, _), (_, text) in zip(calls, results, strict=True)]
    # A forced choice has been honoured; forcing it again would call tools until the round limit.
    forced = ask.tool_choice == "required" or isinstance(ask.tool_choice, dict)
    choice_of = "auto" if forced else ask.tool_choice
    return ask.model_copy(update={"messages": [*ask.messages, assistant, *answers], "tool_choice": choice_of})


async def _log_round(
    gw: Any, call: Any, ask: ChatCompletionRequest, gen: Generation, choice: Choice
) -> float:
    """A round of tool calls as a usage-log row of its own (the request's id, route "...; mcp round N")."""
    route, prompt, response = call.route, call.prompt, call.response
    call.route = f"{route}; mcp round {call.mcp.rounds}"
    if gw.config.log_content:
        call.prompt, call.response = _messages_json(ask), json.dumps(choice.tool_calls)
    try:
        return await gw.log(call, 200, gen.prompt_tokens, gen.completion_tokens)
    finally:
        call.route, call.prompt, call.response = route, prompt, response
        call.fallbacks = []  # each round's row lists the models that failed in that round


async def _run_call(box: Any, run: McpRun, name: str, arguments: str) -> tuple[dict, str]:
    """One MCP call: (its fleet_mcp_calls entry, the tool message's text)."""
    entry: dict[str, Any] = {"name": name, "arguments": arguments}
    if name not in run.tools:
        error = (f"no tool {name} in this request; its MCP tools are: "
                 f"{', '.join(sorted(run.tools)) or 'none'}")
    else:
        try:
            entry["output"] = await box.call(name, arguments)
            return entry, entry["output"]
        except (McpConnectError, McpDisconnectedError) as exc:
            # As for a failed listing: the server's command line and stderr stay in the gateway's log.
            log.warning("MCP call %s: %s", name, exc)
            error = (f"{name}: MCP server {run.tools[name].server} failed (it could not be started or went "
                     "away during the call)")
        except McpError as exc:  # the tool's own error, bad arguments, a timeout: for the model to read
            error = str(exc)
    entry["error"] = error
    return entry, f"error: {error}"


def _messages_json(req: ChatCompletionRequest) -> str:
    return json.dumps([m.model_dump(exclude_none=True) for m in req.messages])


# ------------------------------------------------------------------------------------------------ streams


async def _peek(it: AsyncIterator[Delta], first: Delta | None) -> tuple[list[Delta], bool]:
    """The pieces up to the one that decides what the answer is; True when that is a tool call."""
    pieces: list[Delta] = []
    piece = first
    while piece is not None:
        pieces.append(piece)
        if piece.tool_calls:
            return pieces, True
        if (piece.text and piece.text.strip()) or piece.finish_reason or piece.usage:
            return pieces, False
        piece = await anext(it, None)
    return pieces, False


async def _rest(it: AsyncIterator[Delta]) -> list[Delta]:
    try:
        return [piece async for piece in it]
    except BaseException:
        await close_stream(it)
        raise


def _assemble(pieces: list[Delta], req: ChatCompletionRequest) -> Generation:
    """A streamed answer as a whole one: its text, its calls (fragments joined by index), its usage."""
    calls: dict[int, dict] = {}
    for piece in pieces:
        for pos, fragment in enumerate(piece.tool_calls or []):
            empty = {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
            slot = calls.setdefault(fragment.get("index", pos), empty)
            if fragment.get("id"):
                slot["id"] = fragment["id"]
            fn = _function(fragment)
            slot["function"]["name"] += fn.get("name") or ""
            slot["function"]["arguments"] += fn.get("arguments") or ""
    text = "".join(p.text or "" for p in pieces)
    finish = next((p.finish_reason for p in reversed(pieces) if p.finish_reason), None)
    usage = next((p.usage for p in reversed(pieces) if p.usage), None)
    if usage is None:  # a backend that reports none: counted as failover.py counts a stream
        usage = (prompt_token_bound(req), sum(1 for p in pieces if p.text or p.tool_calls))
    choice = Choice(0, text or None, finish, [calls[i] for i in sorted(calls)])
    return Generation([choice], *usage)


async def _chained(pieces: list[Delta], rest: AsyncIterator[Delta] | None) -> AsyncIterator[Delta]:
    """Pieces already read, then the rest of the stream (closed with this one)."""
    try:
        for piece in pieces:
            yield piece
        if rest is not None:
            async for piece in rest:
                yield piece
    finally:
        if rest is not None:
            await close_stream(rest)
