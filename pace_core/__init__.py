"""pace_core: PARD speculative decoding for low-latency LLM inference on CPUs.

    from pace_core import LLMModel, PardSpecDecodeConfig, SamplingConfig
"""
from .configs import ModelConfig, PardSpecDecodeConfig, SamplingConfig
from .llm import GenerationOutput, GenerationStats, LLMModel, RequestError, StreamChunk
from .loading import ModelLoadError

__all__ = [
    "LLMModel",
    "PardSpecDecodeConfig",
    "SamplingConfig",
    "ModelConfig",
    "GenerationOutput",
    "GenerationStats",
    "StreamChunk",
    "RequestError",
    "ModelLoadError",
]
