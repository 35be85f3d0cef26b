"""Shared helpers for the benchmark scripts: model shapes, the card's name, timing."""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from braid_engine import SamplingParams
from braid_engine.testing import make_tiny_checkpoint

# Qwen3-0.6B's shapes with random weights (speed does not depend on the values)
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 max_position_embeddings=40960, rope_theta=1_000_000.0, init_std=0.02)


def build_model(shape: str, model: str | None) -> Path | str:
    """A local path/hub id as given, or a random checkpoint of a named shape."""
    if model and model != "tiny":
        return model
    overrides = {"tiny": {}, "qwen3-0.6b": QWEN3_06B}[shape]
    return make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix=f"braid-{shape}-")), arch="qwen3", **overrides)


def card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"CPU: {platform.processor() or platform.machine()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def engine_ttft(llm, prompt: list[int], device: torch.device) -> tuple[float, int]:
    """Seconds to the first token, and prompt tokens reused from the cache."""
    t0 = now(device)
    first = next(iter(llm.stream(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))))
    return now(device) - t0, first.num_cached_tokens


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device copy (read + write)."""
    x = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = now(device)
    for _ in range(10):
        y.copy_(x)
    return 2 * x.numel() * 10 / (now(device) - t0)


def head_dim_of(cfg) -> int:
    """A transformers config's head dimension (its ``head_dim``, or hidden size over heads)."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def weight_and_kv_bytes(model) -> tuple[int, int]:
    """A transformers model's weight bytes (tied weights once) and KV bytes per token."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim_of(cfg) * model.dtype.itemsize
    return weights, kv


def forward_flops(model, new: int, cached: int = 0) -> float:
    """FLOPs of a forward over ``new`` tokens after ``cached`` ones whose KV is kept, logits for
    the last token only: the matmuls (2 a weight a token), causal attention (QKᵀ and PV: each new
    token i attends cached + i keys), one row of lm_head."""
    cfg = model.config
    head_dim = head_dim_of(cfg)
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    attn = 4 * new * (cached + (new + 1) / 2) * head_dim * cfg.num_attention_heads * cfg.num_hidden_layers
    return 2 * new * body + attn + 2 * cfg.hidden_size * cfg.vocab_size


def model_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes: which model, where, in what dtype."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny', or a local checkpoint directory / hub id")
    ap.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-0.6b"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-gb", type=float, default=None, help="KV pool size (default: engine's choice)")
    return ap


def add_pipeline_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-pipeline-bursts", action="store_true",
                    help="read each decode burst's tokens before launching the next (LLM(pipeline_bursts=False); "
                         "the default pipelines them where CUDA graphs run)")


def pipeline_setting(args: argparse.Namespace) -> bool | str:
    return False if args.no_pipeline_bursts else "auto"


def kv_kwargs(args: argparse.Namespace) -> dict:
    """``LLM`` keyword arguments for ``--kv-gb`` (none: the engine sizes the pool)."""
    return {"kv_cache_memory": int(args.kv_gb * 2**30)} if args.kv_gb else {}


def graph_time(fn, reps: int = 100) -> float:
    """Seconds a replay of ``fn`` captured in a CUDA graph takes (median of 5 runs of reps)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return replay_time(g, reps)


def replay_time(graph: torch.cuda.CUDAGraph, reps: int = 100) -> float:
    """Seconds a replay of ``graph`` takes back to back (median of 5 runs of ``reps``)."""
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(times)[2]


def alternate(ways: dict[str, Callable[[], Any]], measure: Callable[[Any], tuple[float, Any]], rounds: int,
              warm: bool = False) -> tuple[dict[str, float], dict[str, list[float]], bool]:
    """Each way measured ``rounds`` times, the ways in turn (drift on the machine falls on all of
    them alike): ``ways`` maps a name to a function that sets that way up and returns what
    ``measure`` takes; ``measure`` returns a number and an output. ``warm``: one round first
    that is not recorded. The median number of each way, every run's numbers, and whether the
    ways' last outputs are all the same."""
    values: dict[str, list[float]] = {name: [] for name in ways}
    outputs: dict[str, Any] = {}
    for r in range(rounds + warm):
        for name, way in ways.items():
            value, outputs[name] = measure(way())
            if r >= warm:
                values[name].append(value)
    same = all(o == next(iter(outputs.values())) for o in outputs.values())
    return {n: statistics.median(v) for n, v in values.items()}, values, same
