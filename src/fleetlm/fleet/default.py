"""The fleet `fleet serve` runs when there is no fleet.yaml: the installed catalog models, nothing else.

Every installed catalog model that some engine here can run and that has a chat template (the gemma3 base
model has none: it is not a chat model) joins with `engine: auto` and no price, so that its engine and its
price come from measurement (fleetlm.fleet.measure), and with `dtype: int8`, the width our engine serves it
at (llama.cpp runs the GGUF's own types): int8 batches faster than bf16 and answers as well (Qwen2.5-Coder-
0.5B on all 164 HumanEval and 164 GSM8K items: the same pass@1 and accuracy, docs/FLEET.md). The gateway
adds the MiniLM embedding model by itself.
`auto` is a cascade with checks: the first model of its ladder answers, the checks that apply (code runs its
prompt's examples, math re-checks its arithmetic, JSON and tool calls against their schemas) decide whether
the next one must answer. The ladder is the one fitted on the real fleet's recorded outcomes (train split;
assets/outcomes/policy.json "default", from `fleet fleet fit`) when every installed model was among those it
was chosen from; otherwise (a model the fit never saw) every model, smallest first.
"""

from __future__ import annotations

from typing import Any

import yaml

from fleetlm.catalog import list_models
from fleetlm.config import FleetConfig, parse_config
from fleetlm.errors import ConfigError

DEFAULT_CHECKS = ["code", "math", "json", "tool"]
DEFAULT_DTYPE = "int8"
ROUTER_NAME = "auto"


class NoModelsInstalled(ConfigError):
    """No catalog model is installed, so there is nothing to serve without a fleet.yaml."""


def chat_models() -> list[tuple[str, int]]:
    """(catalog name, parameters) of each installed catalog model an engine here can run as a chat model."""
    from fleetlm.catalog.inspect import read_gguf
    from fleetlm.fleet.measure import engines_for

    out = []
    for item in list_models():
        if item.path is None:
            continue
        if not read_gguf(item.path).metadata.get("tokenizer.chat_template"):
            continue  # a base model: chat requests would fail on it
        if engines_for(item.path):
            out.append((item.entry.name, item.entry.parameters))
    return out


def fitted_ladder(installed: list[str]) -> list[str] | None:
    """The shipped policy's default ladder, when it was chosen among exactly the installed models."""
    from fleetlm.fleet.outcomes import OutcomesError, load_policy

    try:
        spec = load_policy().get("default") or {}
    except OutcomesError:
        return None
    ladder, among = spec.get("ladder") or [], spec.get("chosen_among") or []
    if sorted(among) != sorted(installed) or not ladder or not set(ladder) <= set(installed):
        return None
    return list(ladder)


def default_config_data() -> dict[str, Any]:
    """The default fleet as fleet.yaml data (what `fleet serve --print-config` prints)."""
    models = sorted(chat_models(), key=lambda m: m[1])
    if not models:
        from fleetlm.catalog import entries

        names = [e.name for e in entries().values()]
        raise NoModelsInstalled(f"no catalog model is installed; run: fleet models pull NAME "
                                f"(NAME: {', '.join(names)}), or give --config fleet.yaml")
    data: dict[str, Any] = {"models": {
        name: {"catalog": name, "engine": "auto", "dtype": DEFAULT_DTYPE} for name, _ in models}}
    if len(models) > 1:
        names = [name for name, _ in models]
        data["router"] = {"name": ROUTER_NAME, "kind": "cascade", "checks": list(DEFAULT_CHECKS),
                          "models": fitted_ladder(names) or names}
    else:  # one model: `auto` is that model
        data["router"] = {"name": ROUTER_NAME, "kind": "cheapest"}
    return data


def default_config() -> FleetConfig:
    """The default fleet: the installed catalog chat models (engine auto, int8), `auto` a checks cascade."""
    return parse_config(default_config_data(), "the default fleet")


def default_config_yaml() -> str:
    head = ("# The default fleet (fleet serve without a config): the installed catalog models. Copy it to\n"
            "# fleet.yaml to edit; a model without price: is priced from its measured tokens/s.\n")
    return head + yaml.safe_dump(default_config_data(), sort_keys=False)
