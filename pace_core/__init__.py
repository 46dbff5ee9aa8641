"""pace_core: PARD speculative decoding for low-latency LLM inference on CPUs.

    from pace_core import LLMModel, PardSpecDecodeConfig, SamplingConfig

Names are imported lazily, so tools that only need the topology or the configs
(``python -m cluster.start_node``) do not pay for importing torch and transformers.
"""
from importlib import import_module

_EXPORTS = {
    "LLMModel": ".llm",
    "GenerationOutput": ".llm",
    "GenerationStats": ".llm",
    "Delta": ".outputs",
    "Final": ".outputs",
    "Failed": ".outputs",
    "Usage": ".outputs",
    "GenerationError": ".outputs",
    "RequestError": ".outputs",
    "Overloaded": ".outputs",
    "DeadlineExceeded": ".outputs",
    "EngineFailure": ".outputs",
    "PreparedRequest": ".llm",
    "PardSpecDecodeConfig": ".configs",
    "SamplingConfig": ".configs",
    "ModelConfig": ".configs",
    "ModelLoadError": ".loading",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pace_core' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
