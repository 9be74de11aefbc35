"""The embedded fleet: small models the project trains itself and ships, so `fleet` works offline.

`default_config()` is the gateway config of the shipped fleet (models, prices, fitted router); the recipe
that rebuilds it from a seed is `fleetlm.fleet.recipe` (`fleet fleet build`).
"""

from __future__ import annotations

from pathlib import Path

from fleetlm.config import FleetConfig, load_config
from fleetlm.errors import ConfigError

FLEET_DIR = Path(__file__).resolve().parent.parent / "assets" / "fleet"


def default_config(fleet_dir: str | Path = FLEET_DIR) -> FleetConfig:
    """The shipped fleet's config (paths resolved against its folder)."""
    path = Path(fleet_dir) / "fleet.yaml"
    if not path.is_file():
        raise ConfigError(f"the embedded fleet is missing ({path}); rebuild it with `fleet fleet build`")
    return load_config(path)
