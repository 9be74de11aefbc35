"""`fleet agent run`: steps printed as they happen, tokens and cost at the end, one-line errors."""

import json

from agent_fakes import call
from cli_runner import run_main
from fake_openai import free_port


def test_run_prints_steps_answer_and_cost(gw, monkeypatch, capsys):
    gw.answered_as["auto"] = "qwen-small"  # the gateway says which model `auto` chose
    gw.script("auto", call("calculator", {"expression": "17 * 23"}), call("final_answer", {"answer": "391"}))
    code, out, err = run_main(monkeypatch, capsys, "agent", "run", "What is 17 * 23?",
                              "--tools", "calculator", "--url", gw.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("[1] action (auto -> qwen-small, ")
    assert lines[0].endswith(': calculator({"expression": "17 * 23"})')
    assert lines[1] == "[2] observation: calculator -> 391"
    assert lines[3] == "[4] final: 391" and lines[4] == "answer: 391"
    assert lines[5].startswith("tokens: ") and "cost: $0.000" in lines[5] and "2 requests" in lines[5]
    assert lines[5].endswith("models: qwen-small x2")
    assert [b["model"] for b in gw.bodies()] == ["auto", "auto"]


def test_ladder_files_and_json_output(gw, monkeypatch, capsys, tmp_path):
    gw.script("weak", call("write_file", {"path": "../x", "content": "no"}),
              call("final_answer", {"answer": "ok"}))
    gw.script("strong", call("write_file", {"path": "a.txt", "content": "hi"}))
    code, out, err = run_main(monkeypatch, capsys, "agent", "run", "write hi", "--tools", "files,calculator",
                              "--model", "weak,strong", "--url", gw.url, "--workspace", str(tmp_path),
                              "--json")
    assert code == 0, err
    steps = [json.loads(line) for line in out.splitlines()]
    assert [s["kind"] for s in steps] == ["action", "error", "action", "observation", "action", "final"]
    assert steps[1]["error_type"] == "tool" and steps[1]["retry_model"] == "strong"
    assert steps[-1]["answer"] == "ok" and steps[-1]["totals"]["models"] == {"weak": 2, "strong": 1}
    assert (tmp_path / "a.txt").read_text() == "hi" and not (tmp_path.parent / "x").exists()


def test_no_answer_exits_1_and_errors_are_one_line(gw, monkeypatch, capsys):
    gw.script("m", call("calculator", {"expression": "1"}))
    code, out, _ = run_main(monkeypatch, capsys, "agent", "run", "t", "--model", "m", "--url", gw.url,
                            "--max-steps", "1")
    assert code == 1 and "[3] budget: steps budget exhausted (1 of 1); no answer" in out
    assert out.splitlines()[-2] == "no answer"
    code, _, err = run_main(monkeypatch, capsys, "agent", "run", "t", "--tools", "weather", "--url", gw.url)
    assert code == 2 and err.strip().startswith("error: unknown built-in tool 'weather'")
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_main(monkeypatch, capsys, "agent", "run", "t", "--url",
                            f"http://127.0.0.1:{free_port()}/v1")
    assert code == 2 and err.startswith("error: cannot reach the gateway") and "Traceback" not in err
