"""``inteprelens.models``."""

from fastgim.inteprelens.models.adapters import (
    SUPPORTED_ARCHITECTURES,
    GemmaAdapter,
    GPT2Adapter,
    GPTNeoXAdapter,
    LlamaAdapter,
    MistralAdapter,
    ModelAdapter,
    PhiAdapter,
    get_adapter,
)

__all__ = ["ModelAdapter", "LlamaAdapter", "MistralAdapter", "GPT2Adapter", "GPTNeoXAdapter", "GemmaAdapter",
           "PhiAdapter", "get_adapter", "SUPPORTED_ARCHITECTURES"]
