"""Hub id or local directory → config, tokenizer and safetensors weights. Never unpickles."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from braid_engine.config import ModelConfig
from braid_engine.errors import CheckpointError, ModelNotFoundError
from braid_engine.models.layers import CausalLM
from braid_engine.models.registry import model_class

# what a hub download takes: config, safetensors weights, chat template, and the tokenizer's
# vocabulary in each common form
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*", "spiece.model", "sentencepiece.bpe.model",
              "*.tiktoken"]


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id downloaded (safetensors only) into the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; point to a Hugging Face model directory.")
        return path
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise ModelNotFoundError(
            f"model {str(model)!r} is neither a local directory nor a hub id like 'Qwen/Qwen3-0.6B'."
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(model), allow_patterns=_HUB_FILES)
    except Exception as e:  # offline, unknown repo, auth — all end the same way for the user
        raise ModelNotFoundError(
            f"could not find or download {str(model)!r} ({type(e).__name__}: {e}). Without a "
            "network, download it elsewhere and pass the local directory, or use a tiny test "
            "checkpoint from braid_engine.testing.make_tiny_checkpoint."
        ) from e
    return Path(local)


def load_config(path: Path) -> ModelConfig:
    return ModelConfig.from_file(path / "config.json")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CheckpointError(f"could not load the tokenizer from {path}: {e}") from e
    if len(tokenizer) <= 1:
        # no vocabulary files: transformers makes an empty tokenizer of the model type's class
        # (every text a prompt of no tokens, token 0 an end of sequence)
        raise CheckpointError(f"{path} has no tokenizer vocabulary (tokenizer.json, tokenizer.model, vocab.json, "
                              "…); re-download the checkpoint's tokenizer files.")
    return tokenizer


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}'s weight_map must map tensor names to shard files; re-download it.")
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shards listed in {index.name} are missing: {missing}; re-download them.")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (f" It has {pickled}: pickled weights are never loaded; convert them to safetensors."
                if pickled else "")
        raise CheckpointError(f"no *.safetensors weights in {path}.{hint}")
    return files


def iter_weights(path: Path, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors by name (with ``keep``, only those it keeps: the others are not
    read); a file that cannot be read is a CheckpointError."""
    files = safetensors_files(path)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if keep is None or keep(name):
                        yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"{file.name} is truncated or corrupt ({type(e).__name__}: {e}); re-download it."
            ) from e


def load_model(path: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
               max_positions: int) -> CausalLM:
    cls = model_class(cfg.architecture)
    with torch.device("meta"):
        model = cls(cfg, max_positions=max_positions)
    model = model.to_empty(device=device).to(dtype)
    # the RoPE tables are not in the checkpoint: rebuild them, in float32, on the device
    with torch.device(device):
        rope = type(model.model.rotary)(cfg.head_dim, cfg.rope_theta, max_positions,
                                        cls.interleaved_rope)
    model.model.rotary.cos, model.model.rotary.sin = rope.cos, rope.sin
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    expected = model.checkpoint_names()
    loaded: set[str] = set()
    bar = tqdm(total=len(expected), desc="Loading weights", unit="tensor", disable=None, leave=False)
    with torch.no_grad():
        for name, tensor in iter_weights(path):
            if name not in expected:
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise CheckpointError(
                    f"unexpected tensor {name!r} in the checkpoint for {cfg.architecture}; "
                    "the weights do not match config.json."
                )
            param, rows = expected[name]
            target = param if rows is None else param[rows[0]:rows[0] + rows[1]]
            if tuple(target.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies "
                    f"{tuple(target.shape)}; the weights do not match the config."
                )
            target.copy_(tensor)
            loaded.add(name)
            bar.update(1)
    bar.close()
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(
            f"{len(missing)} tensors are missing from the checkpoint, e.g. {missing[:3]}; "
            "the download is incomplete or the weights belong to another model."
        )
    return model.eval()
