"""fleetlm: the local-first middle layer that makes LLM applications cheap."""

__version__ = "0.1.0"
