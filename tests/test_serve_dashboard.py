"""/dashboard: its numbers from the usage log, and the page in a real headless Chromium (Debian's package,
driven by Selenium): it loads, its charts draw from the logged requests, the console stays clean."""

import json
import shutil
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from fake_openai import free_port
from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.store import UsageStore
from test_app import CONFIG, FixedRouter, Scripted


def make_app(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path / 'd.db'}")
    backends = {n: Scripted(n, fail="down" if n in ("down", "dead") else None) for n in CONFIG["models"]}
    return create_app(parse_config(CONFIG), store, backends, router=FixedRouter())


def traffic(client):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for model in ("auto", "auto", "big", "dead"):
        client.post("/v1/chat/completions", content=json.dumps({"model": model, **chat}))


def test_dashboard_data(tmp_path):
    with TestClient(make_app(tmp_path)) as client:
        traffic(client)
        d = client.get("/dashboard/data?hours=1").json()
        assert client.get("/dashboard/data?hours=x").status_code == 400
        assert "<svg" in client.get("/dashboard").text
    assert d["requests"] == 4
    assert d["router_share"] == {"cheap": 2}
    names = {s["name"]: s for s in d["by_model"]}
    assert sum(names["cheap"]["tokens"]) == 3000 and sum(names["big"]["cost"]) == pytest.approx(0.025)
    # spent: 2 x $0.002 (cheap) + $0.025 (big); all on big (the priciest): 3 x $0.025
    assert d["savings"]["strongest"] == "big"
    assert d["savings"]["spent_usd"] == pytest.approx(0.029)
    assert d["savings"]["all_on_strongest_usd"] == pytest.approx(0.075)
    assert d["latency"]["cheap"]["requests"] == 2 and d["latency"]["cheap"]["p50"] > 0
    assert [r["model_requested"] for r in d["recent"]] == ["dead", "big", "auto", "auto"]


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="chromium / chromedriver (Debian packages) not installed")
def test_dashboard_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = make_app(tmp_path)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    with TestClient(app) as client:
        traffic(client)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"http://127.0.0.1:{port}/dashboard")
        body = driver.find_element(By.TAG_NAME, "body")
        WebDriverWait(driver, 20).until(lambda _: body.get_attribute("data-loaded"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1"
        bars = driver.find_elements(By.CSS_SELECTOR, "#spend-model rect")
        assert {b.get_attribute("data-series") for b in bars} == {"cheap", "big"}
        assert all(float(b.get_attribute("height")) > 0 for b in bars)
        share = driver.find_elements(By.CSS_SELECTOR, "#share rect")
        assert [s.get_attribute("data-series") for s in share] == ["cheap"]
        assert "saved $0.046000" in driver.find_element(By.ID, "savings").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#recent tbody tr")) == 4
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        errors = [e for e in errors if "favicon.ico" not in e["message"]]  # the page has no icon: a 404
        assert errors == []
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(timeout=10)
