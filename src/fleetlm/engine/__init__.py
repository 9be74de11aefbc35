"""The generation engine: prefill/decode with a static KV cache, sampling, stop handling, batching."""

from fleetlm.engine.engine import DTYPES, Engine, UnsupportedDtypeError
from fleetlm.engine.generate import (
    GenerationError,
    GenerationRequest,
    GenerationStats,
    TokenEvent,
    decode_one_token,
    generate,
    prefill,
)
from fleetlm.engine.sampling import SamplingParams, sample

__all__ = [
    "DTYPES",
    "Engine",
    "GenerationError",
    "GenerationRequest",
    "GenerationStats",
    "SamplingParams",
    "TokenEvent",
    "UnsupportedDtypeError",
    "decode_one_token",
    "generate",
    "prefill",
    "sample",
]
