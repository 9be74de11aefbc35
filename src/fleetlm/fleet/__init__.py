"""The fleet: the default one (installed catalog models, `fleet.default`), how fast each model runs here and
what that makes it cost (`fleet.measure`), and the embedded toy fleet that backs `fleet demo`.

`embedded_config()` is the gateway config of the toy fleet shipped in assets/fleet (small models the project
trained itself, with a fitted router); the recipe that rebuilds it from a seed is `fleetlm.fleet.recipe`
(`fleet fleet build`). Nothing defaults to it but `fleet demo` and `fleet fleet info`.
"""

from __future__ import annotations

from pathlib import Path

from fleetlm.config import FleetConfig, load_config
from fleetlm.errors import ConfigError

FLEET_DIR = Path(__file__).resolve().parent.parent / "assets" / "fleet"


def embedded_config(fleet_dir: str | Path = FLEET_DIR) -> FleetConfig:
    """The shipped toy fleet's config (paths resolved against its folder)."""
    path = Path(fleet_dir) / "fleet.yaml"
    if not path.is_file():
        raise ConfigError(f"the embedded fleet is missing ({path}); rebuild it with `fleet fleet build`")
    return load_config(path)
