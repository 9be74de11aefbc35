"""`python -m fleetlm` is the `fleet` command (the demo starts the gateway this way)."""

from fleetlm.cli import main

main()
