"""Conversation memory: fit_context compacts a conversation into a model's context (summary + archive)."""

from fleetlm.memory.archive import Archive, ArchiveError
from fleetlm.memory.compact import ContextOverflow, fit_context, truncate_context

__all__ = ["Archive", "ArchiveError", "ContextOverflow", "fit_context", "truncate_context"]
