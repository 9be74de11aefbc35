"""Typed errors: a FleetError is the user's mistake or a missing resource, shown as one line."""


class FleetError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits with code 2."""


class CheckpointError(FleetError):
    """A path that is missing, is not a checkpoint, or holds an unsupported architecture."""


class ConfigError(FleetError):
    """A fleet, training or router configuration that does not validate."""
