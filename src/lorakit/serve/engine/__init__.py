"""The generation engine: the served model, batched KV cache and the continuous-batching worker."""

from lorakit.serve.engine.batcher import Engine
from lorakit.serve.engine.host import load_base_model
from lorakit.serve.engine.kv import BatchCache, UnsupportedCacheError
from lorakit.serve.engine.requests import EngineStats, GenerationEvent, GenerationRequest

__all__ = [
    "BatchCache",
    "Engine",
    "EngineStats",
    "GenerationEvent",
    "GenerationRequest",
    "UnsupportedCacheError",
    "load_base_model",
]
