"""/v1/responses under `auto` with a cascade with checks: the ladder is climbed as for chat completions (the
cheap model's wrong arithmetic is caught and the strong model answers), whole and streamed."""

import json

import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Choice, Delta, Generation, build_backends
from fleetlm.serve.store import UsageStore

APPLES = "Tom has 3 apples and buys 4 more. How many apples does he have?"
RIGHT = "He has 3 + 4 = 7 apples.\n#### 7"
SLIP = "He has 3 + 4 = 8 apples.\n#### 8"  # the calculator check catches 3 + 4 = 8


class Fixed:
    """A backend that always answers `text`; it counts how often it was asked."""

    def __init__(self, name: str, text: str):
        self.name, self.text, self.asked = name, text, 0

    async def chat(self, req):
        self.asked += 1
        return Generation([Choice(0, self.text, "stop")], prompt_tokens=100, completion_tokens=50)

    async def stream_chat(self, req):
        self.asked += 1
        for word in self.text.split(" "):
            yield Delta(0, word + " ")
        yield Delta(0, None, "stop")
        yield Delta(usage=(100, 50))

    async def aclose(self):
        pass


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_cascade_with_checks_is_climbed(tmp_path, stream):
    models = {n: {"remote": "http://127.0.0.1:9/v1", "price": {"input": i, "output": o}}
              for n, (i, o) in {"cheap": (1.0, 2.0), "strong": (10.0, 30.0)}.items()}
    cfg = parse_config({"models": models, "router": {"name": "auto", "kind": "cascade", "checks": ["math"],
                                                     "models": ["cheap", "strong"]}})
    backends = {"cheap": Fixed("cheap", SLIP), "strong": Fixed("strong", RIGHT)}
    backends.update({k: v for k, v in build_backends(cfg).items() if k not in backends})
    store = UsageStore(f"sqlite:///{tmp_path / 'u.db'}")
    with TestClient(create_app(cfg, store, backends)) as tc:
        r = tc.post("/v1/responses", json={"model": "auto", "input": APPLES, "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "response.completed"
        body = events[-1]["response"]
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert deltas.strip() == RIGHT.strip()
    else:
        body = r.json()
    assert body["model"] == "auto" and body["output"][0]["content"][0]["text"].strip() == RIGHT
    assert r.headers["x-fleet-model"] == "strong"
    assert "cheap rejected (math failed" in r.headers["x-fleet-route"]
    assert backends["cheap"].asked == backends["strong"].asked == 1
    (row,) = store.requests()
    assert row["endpoint"] == "responses" and [a["kept"] for a in row["checks"]] == [False, True]
    assert row["cost_usd"] == pytest.approx((100 * 1 + 50 * 2 + 100 * 10 + 50 * 30) / 1e6)
