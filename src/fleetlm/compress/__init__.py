"""Compression: GGUF export for llama.cpp (quantize, prune and automatic configuration come later)."""

from fleetlm.compress.gguf import GGUFExportError, export_gguf, quantize_gguf

__all__ = ["GGUFExportError", "export_gguf", "quantize_gguf"]
