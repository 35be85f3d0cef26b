"""Typed errors. Each message names the problem and the way out."""


class BraidError(Exception):
    """Base class of every error braid_engine raises on purpose."""


class ModelNotFoundError(BraidError, FileNotFoundError):
    """The model path or hub id could not be resolved to a local checkpoint."""


class UnsupportedArchitectureError(BraidError, ValueError):
    """config.json names an architecture braid_engine has no implementation for."""


class CheckpointError(BraidError, ValueError):
    """The checkpoint's files are missing, truncated, corrupt or inconsistent with its config."""


class ChatTemplateError(BraidError, ValueError):
    """The tokenizer has no chat template, or the template could not render the messages."""


class InvalidRequestError(BraidError, ValueError):
    """A prompt the engine cannot serve (too long, token ids outside the vocabulary, empty)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit in max_model_len."""


class InvalidSamplingParamsError(BraidError, ValueError):
    """A SamplingParams field is out of range."""


class KVCacheFullError(BraidError, RuntimeError):
    """The KV page pool cannot hold a request even after evicting everything evictable."""


class EngineClosedError(BraidError, RuntimeError):
    """The engine was shut down."""


class WaitInsideTogetherError(BraidError, RuntimeError):
    """An output was awaited inside ``LLMEngine.together()``, where the engine takes no step
    until the block ends: it would wait forever."""


class RequestFailedError(BraidError, RuntimeError):
    """A request failed inside the engine (a bug, or a device fault such as running out of
    memory); the engine goes on serving the others. The fault is its ``__cause__``."""


class GrammarUnavailableError(BraidError, ImportError):
    """Guided decoding was requested but the optional ``xgrammar`` package is not installed."""


class InvalidGrammarError(InvalidRequestError):
    """A guided-decoding constraint (JSON schema or structural tag) could not be compiled."""
