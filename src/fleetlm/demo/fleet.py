"""The demo's fleet: the default fleet of `fleet serve`, plus recorded GPT-4 for GSM8K where it is recorded.

The local part is `fleetlm.fleet.default` unchanged: the installed catalog models on engine auto, priced from
their measured speed, and `auto`. When the GSM8K recordings (a RouteLLM-style folder) are present, the fleet
adds `gpt-4-1106-preview@recorded` (the replay backend, at GPT-4's list price) and, when `auto` is a checks
cascade, puts it on top of the ladder: a question the local models fail their checks on goes to GPT-4. The
gateway skips a recorded rung that holds no recording for the prompt, so code and task-suite requests climb
the local models only. Every answer of that model is labelled recorded, by the gateway and by the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fleetlm.errors import FleetError

RECORDED_MODEL = "gpt-4-1106-preview"
RECORDED_NAME = f"{RECORDED_MODEL}@recorded"
RECORDED_BENCHES = ("gsm8k",)  # what the recordings hold answers for


def replay_folder(gsm8k_data: str | Path | None = None) -> Path | None:
    """The RouteLLM-style folder holding gsm8k/ (the GSM8K benchmark's data), or None when it is not here."""
    from fleetlm.evals import gsm8k

    try:
        return gsm8k.data_dir(gsm8k_data).parent
    except FleetError:
        return None


def demo_config_data(replay: Path | None) -> dict[str, Any]:
    """The default fleet as fleet.yaml data, with the recorded model added (and atop `auto`'s ladder)."""
    from fleetlm.fleet.default import default_config_data

    data = default_config_data()
    if replay is None:
        return data
    data["models"][RECORDED_NAME] = {"replay": str(replay), "replay_model": RECORDED_MODEL}
    router = data.get("router") or {}
    if router.get("kind") == "cascade" and router.get("checks") and router.get("models"):
        router["models"] = [*router["models"], RECORDED_NAME]
    return data


def write_demo_config(out: Path, replay: Path | None) -> Path:
    """The demo fleet written as fleet.yaml (kept with the report, so a run can be served again)."""
    path = out / "fleet.yaml"
    head = "# The fleet `fleet demo` served: the default fleet, plus recorded GPT-4 where it is recorded.\n"
    path.write_text(head + yaml.safe_dump(demo_config_data(replay), sort_keys=False))
    return path


def models_for(bench: str, models: list[str], recorded: list[str]) -> list[str]:
    """The models a benchmark is sent to: every local model, and the recorded ones that hold its answers."""
    return [m for m in models if m not in recorded or bench in RECORDED_BENCHES]
