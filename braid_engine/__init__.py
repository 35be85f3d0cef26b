"""braid_engine: an embedded single-GPU inference engine for small decoder-only models."""

from braid_engine.engine.engine import PinHandle
from braid_engine.engine.sequence import RequestOutput
from braid_engine.errors import (
    BraidError,
    ChatTemplateError,
    CheckpointError,
    EngineClosedError,
    GrammarUnavailableError,
    InvalidGrammarError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    KVCacheFullError,
    ModelNotFoundError,
    PromptTooLongError,
    RequestFailedError,
    UnsupportedArchitectureError,
    WaitInsideTogetherError,
)
from braid_engine.grammar import GuidedDecoding
from braid_engine.llm import LLM
from braid_engine.sampling import SamplingParams

__all__ = [
    "LLM", "SamplingParams", "GuidedDecoding", "RequestOutput", "PinHandle", "BraidError", "ChatTemplateError",
    "CheckpointError", "EngineClosedError", "GrammarUnavailableError", "InvalidGrammarError", "InvalidRequestError", "InvalidSamplingParamsError", "KVCacheFullError",
    "ModelNotFoundError", "PromptTooLongError", "RequestFailedError", "UnsupportedArchitectureError",
    "WaitInsideTogetherError",
]
