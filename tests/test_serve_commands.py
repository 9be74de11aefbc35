"""`fleet serve` as a real process on a loopback port, driven by the official openai client."""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from fake_openai import UpstreamServer, free_port
from fleetlm.cli import app
from fleetlm.serve.app import KEY_CACHE_S
from fleetlm.serve.store import UsageStore

FLEET = [sys.executable, "-c", "from fleetlm.cli import main; main()"]


def write_config(tmp_path: Path, upstream_url: str, db: Path) -> Path:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(f"""
models:
  small: {{remote: "{upstream_url}", remote_model: m, price: {{input: 1, output: 2}}, aliases: [s]}}
  large: {{remote: "{upstream_url}", remote_model: m, price: {{input: 10, output: 30}}}}
  flaky: {{remote: "{upstream_url}", remote_model: broken, retries: 1, fallbacks: [small]}}
storage: "sqlite:///{db}"
max_body_bytes: 100000
body_timeout_s: 1.5
""")
    return cfg


class Server:
    def __init__(self, config: Path, cwd: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [*FLEET, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stderr.read()}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def upstream():
    with UpstreamServer() as up:
        yield up


@pytest.fixture(scope="module")
def served(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    db = tmp / "usage.db"
    server = Server(write_config(tmp, upstream.base_url, db), tmp)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    yield server, client, db, tmp
    server.stop()


def test_chat_completions_models_and_streaming_with_the_openai_client(served):
    server, client, db, _ = served
    assert {m.id for m in client.models.list()} == {"small", "large", "flaky", "all-MiniLM-L6-v2"}
    raw = client.chat.completions.with_raw_response.create(
        model="s", messages=[{"role": "user", "content": "two words"}], max_tokens=8
    )
    r = raw.parse()
    assert r.choices[0].message.content == "echo: two words" and r.usage.total_tokens == 2 + 3
    assert raw.headers["x-fleet-model"] == "small" and raw.headers["x-fleet-route"] == "alias:s"
    assert float(raw.headers["x-fleet-cost-usd"]) == pytest.approx((2 * 1 + 3 * 2) / 1e6)

    c = client.completions.create(model="large", prompt="say this", max_tokens=4)
    assert c.choices[0].text == " completed: say this" and c.usage.prompt_tokens == 2

    chunks = list(
        client.chat.completions.create(
            model="large",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip() == "echo: hi" and chunks[-1].usage.completion_tokens == 2
    rows = UsageStore(f"sqlite:///{db}").requests()
    assert [r["model_used"] for r in rows[-3:]] == ["small", "large", "large"]
    assert rows[-1]["cost_usd"] == pytest.approx((1 * 10 + 2 * 30) / 1e6)


def test_fallback_when_the_upstream_fails(served, upstream):
    _, client, _, _ = served
    before = upstream.calls["broken"]
    raw = client.chat.completions.with_raw_response.create(
        model="flaky", messages=[{"role": "user", "content": "rescue me"}]
    )
    assert raw.parse().choices[0].message.content == "echo: rescue me"
    assert raw.headers["x-fleet-model"] == "small" and "fallback from flaky" in raw.headers["x-fleet-route"]
    assert upstream.calls["broken"] - before == 2  # one try and one retry before falling back


def test_errors_through_the_client(served):
    server, client, _, _ = served
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(
            model="small", messages=[{"role": "user", "content": "x"}], max_tokens=-1
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="small", messages=[{"role": "user", "content": "x"}], extra_body={"temperature": "warm"}
        )
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="small", messages=[{"role": "user", "content": "x" * 200_000}])
    assert exc.value.status_code == 413


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{this is not json", 400),
        (b'{"model": "small", "messages": [{"role": "user", "content": "\xff"}]}', 400),
        (b"[]", 400),
    ],
)
def test_raw_bad_bodies(served, body, status):
    server, _, _, _ = served
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert r.status_code == status and "error" in r.json()


def test_lying_content_length_does_not_hang(served):
    server, _, _, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("content-length", "999999999")
    conn.endheaders()
    assert conn.getresponse().status == 413


def test_a_body_that_never_arrives_times_out(served):
    server, _, _, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("content-length", "100")
    conn.endheaders()
    conn.send(b'{"model": ')
    t0 = time.time()
    r = conn.getresponse()
    assert r.status == 408 and time.time() - t0 < 10
    assert json.loads(r.read())["error"]["code"] == "request_timeout"


def test_keys_usage_and_401_through_the_cli(served, monkeypatch):
    server, client, db, tmp = served
    runner = CliRunner()
    url = f"sqlite:///{db}"
    client.chat.completions.create(model="small", messages=[{"role": "user", "content": "count me"}])
    res = runner.invoke(app, ["usage", "--db", url, "--by", "model"])
    assert res.exit_code == 0 and "small" in res.stdout and "TOTAL" in res.stdout
    res = runner.invoke(app, ["usage", "--config", str(tmp / "fleet.yaml"), "--since", "1h"])
    assert "all on large would have cost" in res.stdout
    res = runner.invoke(app, ["usage", "--db", url, "--by", "week"])
    assert res.exit_code != 0
    res = runner.invoke(app, ["keys", "create", "--db", url, "--budget-usd", "1", "--rpm", "100"])
    assert res.exit_code == 0
    secret = res.stdout.strip().splitlines()[-1]
    assert secret.startswith("fk-")
    time.sleep(KEY_CACHE_S + 0.2)  # the gateway re-reads the key table after its short cache expires
    try:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="small", messages=[{"role": "user", "content": "x"}])
        keyed = openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)
        assert keyed.chat.completions.create(
            model="small", messages=[{"role": "user", "content": "k"}]
        ).choices
        res = runner.invoke(app, ["usage", "--db", url, "--by", "key"])
        key_id = runner.invoke(app, ["keys", "list", "--db", url]).stdout.split()[0]
        assert key_id in res.stdout
    finally:
        UsageStore(url).engine.dispose()
        with create_engine(url).begin() as conn:
            conn.execute(text("DELETE FROM api_keys"))


def test_serve_without_config_is_a_one_line_error(tmp_path):
    out = subprocess.run(
        [*FLEET, "serve", "--config", str(tmp_path / "none.yaml")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr


def test_no_answered_request_is_lost_when_the_server_is_killed(upstream, tmp_path):
    db = tmp_path / "kill.db"
    server = Server(write_config(tmp_path, upstream.base_url, db), tmp_path)
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker():
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.post(
                        f"{server.url}/v1/chat/completions",
                        json={"model": "small", "messages": [{"role": "user", "content": "load"}]},
                    )
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    with lock:
                        answered.append(r.headers["x-request-id"])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while len(answered) < 40 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    stop.set()
    for t in threads:
        t.join(timeout=15)
    assert len(answered) >= 40
    logged = {r["request_id"] for r in UsageStore(f"sqlite:///{db}").requests()}
    missing = [rid for rid in answered if rid not in logged]
    assert not missing, f"{len(missing)} answered requests have no record"
    assert json.dumps(sorted(logged))  # the database opens cleanly after the kill
