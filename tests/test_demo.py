"""`fleet demo` end to end on the reduced fleet: a real gateway process, the OpenAI client, the reports."""

import json
import subprocess
import sys

from fleetlm.demo.run import ModelResult, summary_lines


def test_demo_runs_every_model_and_the_router_and_writes_its_reports(ci_fleet, tmp_path):
    fleet_dir, _ = ci_fleet
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "fleetlm", "demo", "--config", str(fleet_dir / "fleet.yaml"), "--n", "2",
         "--out", str(out), "--concurrency", "4"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    names = [r["model"] for r in report["results"]]
    assert names[-1] == "auto" and set(names[:-1]) == {"ci-nano", "ci-small", "ci-arith"}
    for r in report["results"]:
        # the ci fleet's three domains, as its build.json says
        assert r["n"] == report["records"] == 2 * 3 and r["errors"] == 0
        assert set(r["by_domain"]) == {"arithmetic", "strings", "classification"}
        assert r["cost_usd"] > 0 and r["mean_latency_ms"] > 0
    auto = report["results"][-1]
    assert sum(auto["routed_to"].values()) == auto["n"]
    assert set(auto["routed_to"]) <= {"ci-nano", "ci-small", "ci-arith"}
    assert (out / "cost_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<table>" in (out / "report.html").read_text()
    assert "router 'auto' keeps" in proc.stdout


def test_summary_compares_the_router_with_the_strongest():
    strong = ModelResult("big", n=10, correct=8, cost_usd=1.0, latency_s=[0.1])
    auto = ModelResult("auto", n=10, correct=8, cost_usd=0.25, latency_s=[0.1])
    auto.routed_to.update({"small": 7, "big": 3})
    lines = summary_lines([strong, auto], "big", "auto")
    assert "small 70%" in lines[2] and "big 30%" in lines[2]
    assert lines[-1] == "router 'auto' keeps 100.0% of big's accuracy at 25.0% of its cost (saves 75.0%)"
