"""Model classes keyed by the ``architectures`` name in config.json."""

from __future__ import annotations

from braid_engine.errors import UnsupportedArchitectureError
from braid_engine.models.ernie4_5 import Ernie4_5ForCausalLM
from braid_engine.models.layers import CausalLM
from braid_engine.models.llama import LlamaForCausalLM
from braid_engine.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Ernie4_5ForCausalLM": Ernie4_5ForCausalLM,
}


def model_class(architecture: str) -> type[CausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: "
            f"{', '.join(sorted(MODEL_REGISTRY))}."
        ) from None
