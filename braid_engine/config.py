"""Model configuration parsed from a checkpoint's config.json, and engine settings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from braid_engine.errors import BraidError, CheckpointError


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    torch_dtype: torch.dtype = torch.float32
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        if not isinstance(cfg, dict):
            raise CheckpointError(f"config.json holds a {type(cfg).__name__}, not an object of fields; "
                                  "re-download the checkpoint.")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
            raise CheckpointError(
                f"config.json's 'architectures' is {archs!r}; it must list the model class name, "
                "e.g. \"architectures\": [\"Qwen3ForCausalLM\"]."
            )
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope = cfg.get("rope_parameters") or {}
            for scaling in (rope, cfg.get("rope_scaling") or {}):
                # "type" is the key older checkpoints write (LLaMA-2-7B-32K, yarn in Qwen2.5's README)
                rope_type = scaling.get("rope_type", scaling.get("type"))
                if rope_type not in ("default", None):
                    raise CheckpointError(
                        f"rope type {rope_type!r} is not supported yet; only default RoPE is."
                    )
            _refuse_sliding_window(cfg)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            use_bias = bool(cfg.get("use_bias", False))
            return cls(
                architecture=archs[0],
                model_type=cfg.get("model_type", ""),
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", cfg.get("model_type") in _TIED_BY_DEFAULT)),
                hidden_act=cfg.get("hidden_act", "silu"),
                attention_bias=bool(cfg.get("attention_bias", use_bias)),
                mlp_bias=bool(cfg.get("mlp_bias", use_bias)),
                torch_dtype=_parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
                eos_token_ids=eos_ids,
                raw=cfg,
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks the required field {e.args[0]!r}.") from e
        except BraidError:
            raise
        except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong kind (null, a list, "1e-6x")
            raise CheckpointError(f"config.json has a field of the wrong kind ({type(e).__name__}: {e}); "
                                  "compare it with the model's published config.json.") from e

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"config.json's {name} is {getattr(self, name)}; it must be at least 1.")
        if self.max_position_embeddings < 2:
            raise CheckpointError(f"config.json's max_position_embeddings is {self.max_position_embeddings}: no "
                                  "prompt and answer fit; it must be at least 2.")

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); re-download the checkpoint.") from e


# model types whose transformers config ties the embeddings where config.json does not say
_TIED_BY_DEFAULT = ("ernie4_5",)


def _refuse_sliding_window(cfg: dict[str, Any]) -> None:
    """Raise where transformers would attend some layer through a sliding window: the engine
    attends every layer to the whole sequence, so its logits would differ past the window."""
    layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is not None:
        sliding = "sliding_attention" in types
    else:  # Qwen2/Qwen3's switch: the window from layer max_window_layers on (their defaults)
        sliding = (bool(cfg.get("use_sliding_window")) and cfg.get("sliding_window", 4096) is not None
                   and int(cfg.get("max_window_layers", 28)) < layers)
    if sliding:
        raise CheckpointError(
            f"config.json asks for sliding-window attention (sliding_window={cfg.get('sliding_window')}), "
            "which the engine does not support; every layer attends the whole sequence here. Set "
            "use_sliding_window to false (and layer_types to full_attention) if the model allows it.")


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def _parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"dtype {name} is not one the engine computes in; use float32, float16 or bfloat16.")
        return name
    try:
        return _DTYPES[str(name).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(set(_DTYPES))} or 'auto'.") from None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: the engine runs on 'cpu' or 'cuda' (or 'auto').")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available; use device='cpu' or 'auto'.")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """'auto' is the checkpoint's dtype on GPU and float32 on CPU."""
    if dtype == "auto":
        return checkpoint_dtype if device.type == "cuda" else torch.float32
    return _parse_dtype(dtype)


@dataclass
class EngineConfig:
    """Engine settings. Sizes are in tokens unless named otherwise."""

    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    page_size: int = 16
    num_pages: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    max_pinned_fraction: float = 0.5
    attention_backend: str = "torch"
    cascade: str = "auto"
    decode_burst: int = 8  # decode steps run back to back between token reads; 1: every step
    # launch the next burst for the same sequences before reading the last one's tokens, so the
    # GPU does not idle while the host takes them (a sequence that stops drops its share);
    # LLM(pipeline_bursts="auto") turns it on where CUDA graphs run
    pipeline_bursts: bool = False
    # while sequences decode, a prompt is prefilled at most this many tokens a step, in a forward
    # of its own after theirs (its prefill graphs, their decode graph) instead of one mixed
    # eager forward; None: prefills take the step budget and share the decodes' forward
    prefill_chunk_while_decoding: int | None = None
