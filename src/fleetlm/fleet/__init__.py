"""The fleet: the default one (installed catalog models, `fleet.default`), how fast each model runs here
and what that makes it cost (`fleet.measure`), the real fleet's recorded outcomes (`fleet.record`,
`fleet.outcomes`), and the recipe that trains a tiny toy fleet from a seed on the task suite (`fleet.recipe`,
`fleet fleet build`; nothing ships such a fleet and nothing defaults to one).
"""

from __future__ import annotations

from pathlib import Path

from fleetlm.config import FleetConfig, load_config
from fleetlm.errors import ConfigError


def built_config(fleet_dir: str | Path) -> FleetConfig:
    """The config of a fleet built by `fleet fleet build` (paths resolved against its folder)."""
    path = Path(fleet_dir) / "fleet.yaml"
    if not path.is_file():
        raise ConfigError(f"no built fleet in {fleet_dir} (no fleet.yaml); build one with "
                          "`fleet fleet build`")
    return load_config(path)
