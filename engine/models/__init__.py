"""Registry of the model architectures the engine runs, keyed by the name in a
checkpoint's ``config.json`` ``architectures``. Importing this package does not
import torch; ``get_model_class`` loads the implementation on demand."""

from __future__ import annotations

import importlib
from typing import Any

# architecture name -> (module under baton.engine.models, class name)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "GraniteForCausalLM": ("llama", "LlamaForCausalLM"),
    "Phi3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Olmo2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "GemmaForCausalLM": ("llama", "LlamaForCausalLM"),
    "Gemma2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Gemma3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "MixtralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2MoeForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3MoeForCausalLM": ("llama", "LlamaForCausalLM"),
    "OlmoeForCausalLM": ("llama", "LlamaForCausalLM"),
    "GraniteMoeForCausalLM": ("llama", "LlamaForCausalLM"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)


def get_model_class(architecture: str) -> Any:
    """The ``torch.nn.Module`` class implementing ``architecture``."""
    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    module_name, class_name = _ARCHITECTURES[architecture]
    module = importlib.import_module(f"baton.engine.models.{module_name}")
    return getattr(module, class_name)
