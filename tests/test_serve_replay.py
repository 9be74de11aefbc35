"""The replay backend: recorded GPT-4 / Mixtral answers served through the gateway, labelled as recorded."""

import csv
import json
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.errors import ConfigError
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import build_backends
from fleetlm.serve.commands import usage_report
from fleetlm.serve.replay import count_tokens, load_recordings
from fleetlm.serve.store import UsageStore

STRONG = "gpt-4-1106-preview"
WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
SHARED = [Path(__file__).resolve().parents[1].parent / "shared" / "data" / "routellm",
          Path("/work/shared/data/routellm")]

QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "A pen costs $2. How much do 5 pens cost?",
    "Ann reads 10 pages a day. How many pages does she read in 7 days?",
]


def make_folder(root: Path, rows=None) -> Path:
    """A folder laid out like RouteLLM's, with three recorded GSM8K rows (fields padded as RouteLLM's are)."""
    (root / "gsm8k").mkdir(parents=True)
    rows = rows or [
        (QUESTIONS[0], True, False, "3 + 4 = <<3+4=7>>7\n#### 7", "3 + 4 = 8\n#### 8"),
        (QUESTIONS[1], True, True, "5 x $2 = $10\n#### 10", "#### 10"),
        (QUESTIONS[2], False, True, "10 * 7 = 60\n#### 60", "10 * 7 = 70\n#### 70"),
    ]
    with (root / "gsm8k" / "gsm8k_responses.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", WEAK, STRONG, WEAK + "_response", STRONG + "_response"])
        for q, strong_ok, weak_ok, strong_resp, weak_resp in rows:
            w.writerow([" " + q, f" {weak_ok}", f" {strong_ok}", " " + weak_resp, " " + strong_resp + "\n"])
    (root / "gsm8k" / "contaminated_prompts.jsonl").write_text(
        json.dumps({"train_prompt": "x", "eval_prompt": "never served", "train_idx": 0, "eval_idx": 0}) + "\n"
    )
    return root


def config(folder: Path, **extra) -> dict:
    return {
        "models": {
            "gpt4": {"replay": str(folder), "replay_model": STRONG, **extra},
            "mixtral": {"replay": str(folder), "replay_model": "Mixtral-8x7B-Instruct"},
        }
    }


@pytest.fixture
def served(tmp_path):
    cfg = parse_config(config(make_folder(tmp_path / "rec")))
    store = UsageStore(f"sqlite:///{tmp_path / 'u.db'}")
    with TestClient(create_app(cfg, store, build_backends(cfg))) as http:
        client = openai.OpenAI(
            base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0
        )
        yield client, http, store, cfg


def ask(client, question, model="gpt4", **kw):
    return client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], **kw
    )


def test_a_recorded_question_gets_the_recorded_answer_labelled_and_priced(served):
    client, _, store, cfg = served
    raw = ask(client, QUESTIONS[0])
    resp = raw.parse()
    assert resp.choices[0].message.content == "3 + 4 = <<3+4=7>>7\n#### 7"  # the CSV's padding stripped
    assert resp.model == "gpt-4-1106-preview@recorded"
    assert raw.headers["x-fleet-route"] == "direct; recorded: gpt-4-1106-preview@recorded"
    label = resp.fleet["recorded"]
    assert label == {"model": STRONG, "benchmark": "gsm8k", "id": label["id"], "correct": True}
    assert label["id"].startswith("gsm8k-")
    # OpenAI's count for one chat message: 3 + role + content, plus 3 for the reply
    assert resp.usage.prompt_tokens == 3 + count_tokens("user") + count_tokens(QUESTIONS[0]) + 3
    assert resp.usage.completion_tokens == count_tokens("3 + 4 = <<3+4=7>>7\n#### 7")
    assert cfg.models["gpt4"].price.input == 10 and cfg.models["gpt4"].price.output == 30  # list price
    cost = (resp.usage.prompt_tokens * 10 + resp.usage.completion_tokens * 30) / 1e6
    assert float(raw.headers["x-fleet-cost-usd"]) == pytest.approx(cost)
    (row,) = store.requests()
    assert row["recorded"] == 1 and row["model_used"] == "gpt4" and row["cost_usd"] == pytest.approx(cost)
    report = usage_report(store, cfg, None, "model")
    assert "gpt4@recorded" in report


def test_recorded_models_are_listed_as_recorded(served):
    client, *_ = served
    owners = {m.id: m.owned_by for m in client.models.list()}
    assert owners["gpt4"] == owners["mixtral"] == "fleetlm-recorded"


def test_an_older_usage_log_gains_the_new_columns(tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)  # the requests table as gateways before replay wrote it
    columns = (
        "id INTEGER PRIMARY KEY, request_id VARCHAR(64) NOT NULL, created FLOAT NOT NULL, "
        "endpoint VARCHAR(32) NOT NULL, model_requested VARCHAR(200) NOT NULL, model_used VARCHAR(200), "
        "route_reason TEXT, predicted_quality FLOAT, fallbacks TEXT, prompt_tokens INTEGER NOT NULL, "
        "completion_tokens INTEGER NOT NULL, cost_usd FLOAT NOT NULL, latency_ms FLOAT, ttft_ms FLOAT, "
        "status INTEGER NOT NULL, error TEXT, stream INTEGER NOT NULL, key_id VARCHAR(32), user VARCHAR(200)"
    )
    con.execute(f"CREATE TABLE requests ({columns})")
    con.execute(
        "INSERT INTO requests (request_id, created, endpoint, model_requested, prompt_tokens, "
        "completion_tokens, cost_usd, status, stream) VALUES ('old', 1.0, 'chat', 'm', 1, 1, 0.5, 200, 0)"
    )
    con.commit()
    con.close()
    from fleetlm.serve.store import RequestRecord

    store = UsageStore(f"sqlite:///{db}")
    store.log(RequestRecord("new", "chat", "gpt4", 200, model_used="gpt4", recorded=True,
                            checks=[{"model": "gpt4", "kept": True, "checks": []}]))
    old, new = store.requests()
    assert old["recorded"] == 0 and old["checks"] is None
    assert new["recorded"] == 1 and new["checks"][0]["model"] == "gpt4"


def test_the_weak_model_by_its_short_name_and_its_grade(served):
    client, *_ = served
    resp = ask(client, QUESTIONS[0], model="mixtral").parse()
    assert resp.model == "mistralai/Mixtral-8x7B-Instruct-v0.1@recorded"
    assert resp.choices[0].message.content == "3 + 4 = 8\n#### 8"
    assert resp.fleet["recorded"]["correct"] is False


def test_a_wrapped_question_still_matches_but_nothing_fuzzy_does(served):
    client, http, store, _ = served
    wrapped = f"Solve the problem step by step.\n\nQuestion:   {QUESTIONS[1]}\nAnswer:"
    assert ask(client, wrapped).parse().choices[0].message.content == "5 x $2 = $10\n#### 10"
    r = http.post("/v1/chat/completions", json={"model": "gpt4", "messages": [
        {"role": "user", "content": QUESTIONS[1].replace("5 pens", "6 pens")}]})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "recording_not_found"
    assert "no recorded answer" in err["message"]
    with pytest.raises(openai.NotFoundError):
        ask(client, "never served")  # a contaminated prompt is dropped, like any unknown one
    assert [row["status"] for row in store.requests()][-2:] == [404, 404]


def test_exact_matching_refuses_a_wrapped_question(tmp_path):
    cfg = parse_config(config(make_folder(tmp_path / "rec"), replay_match="exact"))
    store = UsageStore(f"sqlite:///{tmp_path / 'u.db'}")
    with TestClient(create_app(cfg, store, build_backends(cfg))) as http:
        body = {"model": "gpt4", "messages": [{"role": "user", "content": "Q: " + QUESTIONS[1]}]}
        assert http.post("/v1/chat/completions", json=body).status_code == 404
        body["messages"][0]["content"] = "  " + QUESTIONS[1].replace(" ", "\n ")  # whitespace is normalised
        assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_streaming_sends_the_recorded_text_in_pieces(served):
    client, _, store, _ = served
    stream = client.chat.completions.create(
        model="gpt4", messages=[{"role": "user", "content": QUESTIONS[2]}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "10 * 7 = 60\n#### 60"  # the recorded GPT-4 got this one wrong
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert all(c.model == "gpt-4-1106-preview@recorded" for c in chunks)
    assert chunks[-1].usage.completion_tokens == count_tokens(text)
    row = store.requests()[-1]
    assert row["recorded"] == 1 and row["stream"] == 1 and row["completion_tokens"] == count_tokens(text)


def test_limits_and_unsupported_requests(served):
    client, http, _, _ = served
    cut = ask(client, QUESTIONS[2], max_tokens=3).parse()
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    stopped = ask(client, QUESTIONS[2], stop=["####"]).parse()
    assert stopped.choices[0].message.content == "10 * 7 = 60\n"
    r = http.post("/v1/chat/completions", json={"model": "gpt4", "n": 2, "messages": [
        {"role": "user", "content": QUESTIONS[2]}]})
    assert r.status_code == 400 and "n must be 1" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": "gpt4", "prompt": QUESTIONS[2]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "10 * 7 = 60\n#### 60"


def test_a_second_folder_of_the_same_layout_works(tmp_path):
    rows = [(f"What is {i} + {i}?", True, True, f"{i} + {i} = {2 * i}\n#### {2 * i}", "#### 0")
            for i in range(3)]
    folder = make_folder(tmp_path / "other", rows)
    rec = load_recordings(str(folder), STRONG)
    assert len(rec) == 3 and rec.lookup("What is 2 + 2?").response == "2 + 2 = 4\n#### 4"


@pytest.mark.parametrize("damage", ["missing", "no_gsm8k", "garbled", "unknown_model"])
def test_a_bad_folder_fails_at_start_up_with_one_line(tmp_path, damage):
    folder = tmp_path / "rec"
    model = STRONG
    if damage == "no_gsm8k":
        folder.mkdir()
    elif damage == "garbled":
        (folder / "gsm8k").mkdir(parents=True)
        (folder / "gsm8k" / "gsm8k_responses.csv").write_text("question,answer\nwhat,42\n")
    elif damage == "unknown_model":
        make_folder(folder)
        model = "claude-9"
    cfg = parse_config({"models": {"gpt4": {"replay": str(folder), "replay_model": model}}})
    with pytest.raises(ConfigError) as err:
        build_backends(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith("models.gpt4: replay folder")


def test_a_relative_replay_folder_is_read_from_the_config_files_folder(tmp_path):
    from fleetlm.config import load_config

    make_folder(tmp_path / "data" / "rec")
    yaml = "models:\n  gpt4: {replay: data/rec, replay_model: gpt-4-1106-preview}\n"
    (tmp_path / "fleet.yaml").write_text(yaml)
    cfg = load_config(tmp_path / "fleet.yaml")
    assert cfg.models["gpt4"].replay == str((tmp_path / "data" / "rec").resolve())
    assert build_backends(cfg)["gpt4"].lookup(QUESTIONS[0]).correct is True


def test_config_needs_a_replay_model():
    with pytest.raises(ConfigError, match="replay needs replay_model"):
        parse_config({"models": {"gpt4": {"replay": "/x"}}})
    with pytest.raises(ConfigError, match="exactly one of"):
        parse_config({"models": {"gpt4": {"replay": "/x", "replay_model": STRONG, "remote": "http://h/v1"}}})


def test_the_real_routellm_folder():
    folder = next((p for p in SHARED if (p / "gsm8k" / "gsm8k_responses.csv").is_file()), None)
    if folder is None:
        pytest.skip("the shared RouteLLM data is not here")
    with (folder / "gsm8k" / "gsm8k_responses.csv").open(encoding="utf-8", newline="") as f:
        first = next(csv.DictReader(f))
    rec = load_recordings(str(folder), STRONG)
    hit = rec.lookup(first["prompt"])
    assert len(rec) >= 600 and hit is not None
    assert hit.response == first[STRONG + "_response"].strip()
    assert hit.correct == (first[STRONG].strip() == "True")
