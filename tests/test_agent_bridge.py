"""fleetlm.sandbox.bridge and the code agent: tools reached from the sandbox only through the bridge.

Everything here runs model-style code in the bubblewrap sandbox, so it is skipped without bwrap.
"""

import ast
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from agent_fakes import code
from fleetlm.agent.loop import CodeAgent
from fleetlm.agent.tools import calculator_tool, file_tools
from fleetlm.sandbox import SandboxError, run_python
from fleetlm.sandbox.bridge import BRIDGE_DIR, SOCKET_NAME, ToolBridge, run_python_with_tools

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

REPO = Path(__file__).resolve().parents[1]


def adder(name, args):
    if name == "add":
        return str(args["a"] + args["b"])
    raise ValueError(f"{name} is broken")


FUNCTIONS = {"add": ["a", "b"], "broken": []}


# ---------------------------------------------------------------- the bridge


def test_tools_are_functions_and_final_answer_ends_the_program():
    program = """
print(add(2, 3), add(a=4, b=5))
try:
    broken()
except ToolCallError as exc:
    print("caught:", exc)
import fleet_tools
print(fleet_tools.add(1, 1), add.__doc__)
final_answer({"sum": 9})
print("never printed")
"""
    r = run_python_with_tools(program, FUNCTIONS, adder, descriptions={"add": "Add a and b."})
    assert r.sandbox.passed and r.answered and r.answer == {"sum": 9}
    assert r.sandbox.stdout == "5 9\ncaught: broken is broken\n2 Add a and b.\n"
    assert [(c.tool, c.arguments, c.result, c.error) for c in r.calls] == [
        ("add", {"a": 2, "b": 3}, "5", None), ("add", {"a": 4, "b": 5}, "9", None),
        ("broken", {}, None, "broken is broken"), ("add", {"a": 1, "b": 1}, "2", None),
        ("final_answer", {"answer": {"sum": 9}}, "ok", None)]
    assert [c.tool for c in r.failed_calls] == ["broken"]


def test_a_failing_program_shows_its_own_lines_and_no_answer():
    def missing_b(name, args):
        raise LookupError("b is missing")

    r = run_python_with_tools("x = 1\ny = add(x)\n", FUNCTIONS, missing_b)
    assert not r.sandbox.passed and not r.answered
    assert 'File "<agent code>", line 2' in r.sandbox.stderr and "y = add(x)" in r.sandbox.stderr
    assert "main.py" not in r.sandbox.stderr
    assert r.sandbox.reason == "exit 1: fleet_tools.ToolCallError: b is missing"
    r = run_python_with_tools("add(1, 2, 3)", FUNCTIONS, adder)
    assert "takes at most 2 positional arguments" in r.sandbox.stderr and not r.calls


def test_only_declared_tools_with_the_token_are_served():
    program = """
import json, socket
call = add.__globals__["_call"]
try:
    call("secret_tool", [], (), {})
except ToolCallError as exc:
    print("undeclared:", exc)
s = socket.socket(socket.AF_UNIX)
s.connect("/bridge/tools.sock")
f = s.makefile("rwb")
lines = [b'{"tool": "add", "arguments": {"a": 1, "b": 2}}', b'not json', b'{"token": "guess", "tool": "add"}']
for line in lines:
    f.write(line + b"\\n"); f.flush()
    print("raw:", json.loads(f.readline())["error"])
"""
    r = run_python_with_tools(program, FUNCTIONS, adder)
    assert r.sandbox.passed, r.sandbox.stderr
    assert r.sandbox.stdout.splitlines() == [
        "undeclared: there is no tool named 'secret_tool' here",
        "raw: refused: not this run's bridge token",
        "raw: a call must be one JSON object per line",
        "raw: refused: not this run's bridge token"]
    assert [c.tool for c in r.calls] == ["secret_tool"]  # refused lines never reach a tool


def test_a_huge_line_and_too_many_calls_are_refused():
    with ToolBridge({"add": ["a", "b"]}, adder, max_calls=3) as bridge:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(bridge.host_dir / SOCKET_NAME))
        f = sock.makefile("rwb")
        for _ in range(4):
            f.write(json.dumps({"token": bridge.token, "tool": "add", "arguments": {"a": 1, "b": 1}}).encode()
                    + b"\n")
            f.flush()
        replies = [json.loads(f.readline()) for _ in range(4)]
        assert [r.get("result") for r in replies[:3]] == ["2", "2", "2"]
        assert "more than 3 tool calls" in replies[3]["error"]
        f.write(b"x" * (1024 * 1024 + 10) + b"\n")
        f.flush()
        assert "longer than" in json.loads(f.readline())["error"]
        assert f.readline() == b""  # and the connection is dropped
        sock.close()
        # The socket's folder is private to us (and the sandbox's user), not world-enterable.
        assert stat.S_IMODE(bridge.host_dir.stat().st_mode) == 0o700
    assert not bridge.host_dir.exists()


def test_bad_tool_names_and_binds_are_refused():
    with pytest.raises(SandboxError, match="cannot be a Python function"):
        ToolBridge({"not-ok": []}, adder)
    with pytest.raises(SandboxError, match="cannot be a Python function"):
        ToolBridge({"final_answer": []}, adder)
    with pytest.raises(SandboxError, match="new top-level folder"):
        run_python("print(1)", binds=[("/tmp", "/usr")])
    with pytest.raises(SandboxError, match="new top-level folder"):
        run_python("print(1)", binds=[("/nonexistent-host-path", "/x")])


def test_sandboxed_code_reaches_nothing_but_the_bridge(tmp_path):
    # Things on the host the code will try to reach: a TCP listener on loopback, a Unix socket in a
    # folder, an abstract Unix socket, the repository and a secret file.
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    unix_path = tmp_path / "host.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(unix_path))
    unix.listen()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0fleet-test-{os.getpid()}")
    abstract.listen()
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    program = f"""
import os, socket
def attempt(label, fn):
    try:
        fn()
        print(label, "REACHED")
    except Exception as exc:
        print(label, "blocked", type(exc).__name__)
def tcp():
    socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]}), timeout=2)
def unix(path):
    s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(path)
attempt("tcp", tcp)
attempt("dns", lambda: socket.getaddrinfo("pypi.org", 443))
attempt("unix", lambda: unix({str(unix_path)!r}))
attempt("abstract", lambda: unix("\\0fleet-test-{os.getpid()}"))
attempt("secret", lambda: open({str(secret)!r}).read())
attempt("repo", lambda: open({str(REPO / "README.md")!r}).read())
attempt("etc", lambda: open("/etc/passwd").read())
attempt("bridge-write", lambda: open("/bridge/x", "w"))
attempt("bridge", lambda: unix("/bridge/tools.sock"))
print("root", sorted(os.listdir("/")))
print("bridge-dir", os.listdir("/bridge"))
print(add(1, 2))
"""
    r = run_python_with_tools(program, FUNCTIONS, adder)
    # A connection that got through would wait in the listeners' backlogs.
    for listener in (tcp, unix, abstract):
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
        listener.close()
    lines = r.sandbox.stdout.splitlines()
    assert r.sandbox.passed, r.sandbox.stderr
    results = dict(line.split(" ", 1) for line in lines[:9])
    for label in ("tcp", "dns", "unix", "abstract", "secret", "repo", "etc", "bridge-write"):
        assert results[label].startswith("blocked"), (label, results[label])
    assert results["bridge"] == "REACHED"
    # Only the sandbox's own folders; no /tmp, /home, /etc, /root or the repository.
    allowed = {"bin", "bridge", "dev", "lib", "lib32", "lib64", "libx32", "proc", "sandbox", "sbin", "usr"}
    assert set(ast.literal_eval(lines[9].removeprefix("root "))) <= allowed
    assert lines[10] == f"bridge-dir {[SOCKET_NAME]!r}" and lines[11] == "3"
    assert BRIDGE_DIR == "/bridge"


# ---------------------------------------------------------------- the code agent


def test_the_code_agent_calls_tools_over_the_bridge(gw, tmp_path):
    (tmp_path / "n.txt").write_text("17")
    program = 'n = int(read_file(path="n.txt"))\nprint("n is", n)\nprint(calculator(f"{n} * 3"))'
    gw.script("coder", code(program),
              code('final_answer(calculator("17 * 3"))'))
    a = CodeAgent([calculator_tool(), *file_tools(tmp_path)], url=gw.url, models="coder")
    steps = list(a.run("Read n from n.txt and multiply it by 3."))
    assert [s.kind for s in steps] == ["action", "observation", "action", "observation", "final"]
    assert steps[0].code.startswith("n = int(read_file") and steps[0].model == "coder" and steps[0].tokens > 0
    obs = steps[1]
    assert obs.output.startswith("n is 17\n51\nTool calls:\nread_file(")
    assert [(c["tool"], c["result"]) for c in obs.calls] == [("read_file", "17"), ("calculator", "51")]
    assert steps[-1].answer == "51" and steps[-1].totals.requests == 2
    bodies = gw.bodies()
    assert [b["fleet_step"] for b in bodies] == ["code", "code"] and "tools" not in bodies[0]
    system = bodies[0]["messages"][0]["content"]
    assert "calculator(expression: string)" in system and "read_file(path: string)" in system
    assert "Output:\nn is 17\n51" in bodies[1]["messages"][-1]["content"]


def test_code_failures_escalate(gw):
    gw.script("weak", "I think the answer is 4.", code("x = 1 +"), code("print(1/0)"),
              code('calculator("1/0")'))
    gw.script("strong", code("final_answer(4)"), code("final_answer(4)"), code("final_answer(4)"),
              code("final_answer(4)"))
    a = CodeAgent([calculator_tool()], url=gw.url, models=["weak", "strong"])
    found = []
    for _ in range(4):
        steps = list(a.run("2+2?"))
        errors = [s for s in steps if s.kind == "error"]
        assert len(errors) == 1 and errors[0].retry_model == "strong" and steps[-1].answer == "4"
        found.append((errors[0].error_type, errors[0].error.splitlines()[0]))
    assert found[0] == ("parse", "the reply had no ```python code block: 'I think the answer is 4.'")
    assert found[1] == ("parse", "syntax error on line 1: invalid syntax")
    assert found[2][0] == "code" and "ZeroDivisionError" in found[2][1]
    assert found[3][0] == "tool" and "division by zero" in found[3][1]
    assert [b["fleet_step"] for b in gw.bodies("strong")] == ["retry"] * 4


def test_the_code_agent_can_manage_a_tool_calling_agent(gw):
    from agent_fakes import call
    from fleetlm.agent.loop import ToolCallingAgent

    gw.script("worker", call("calculator", {"expression": "6*7"}), call("final_answer", {"answer": "42"}))
    gw.script("coder", code('final_answer(mathematician(task="6*7"))'))
    worker = ToolCallingAgent([calculator_tool()], url=gw.url, models="worker", name="mathematician")
    steps = list(CodeAgent([worker.as_tool()], url=gw.url, models="coder").run("6*7?"))
    assert [s.kind for s in steps] == ["action", "observation", "final"] and steps[-1].answer == "42"
    assert steps[1].substeps and steps[-1].totals.requests == 3 and steps[1].tokens > 0

