"""The gateway: an OpenAI-compatible server in front of the fleet, with routing, fallbacks and a usage log."""
