"""Fused-kernel compatibility: which layers of a checkpoint are safe for the Triton kernels.

The fused kernels round exactly where PyTorch does, but their float32 sums add in another
order, so now and then a normalised value lands one model-dtype unit away from torch's. A norm
weight multiplies that slip: with Qwen3-0.6B's k_norm weights of 96.5 one bf16 unit (0.0078)
becomes 0.75 in a key. This module scores every layer's norm weights by that amplification,
warns, and names the layers that keep the unfused torch path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# one bf16 unit of a normalised value near 1, the slip a different summation order can cause
BF16_UNIT = 2.0 ** -8
# weights beyond these turn that slip into a visible change of a key or hidden state
WARN_WEIGHT = 8.0
RISK_WEIGHT = 32.0

_NORM = re.compile(r"^model\.(?:layers\.(\d+)\.)?(?:self_attn\.)?(\w*norm)\.weight$")


@dataclass
class NormStats:
    name: str
    max_abs: float
    median_abs: float

    @property
    def score(self) -> float:
        """Worst absolute error one rounding slip of a normalised value becomes."""
        return self.max_abs * BF16_UNIT

    @property
    def level(self) -> str:
        if self.max_abs >= RISK_WEIGHT:
            return "risk"
        return "warn" if self.max_abs >= WARN_WEIGHT else "ok"


@dataclass
class CompatReport:
    """Per-layer norm statistics; ``layer`` -1 is the final norm."""

    layers: dict[int, list[NormStats]] = field(default_factory=dict)

    def level(self, layer: int) -> str:
        levels = [s.level for s in self.layers.get(layer, [])]
        return "risk" if "risk" in levels else "warn" if "warn" in levels else "ok"

    @property
    def risky_layers(self) -> set[int]:
        return {i for i in self.layers if i >= 0 and self.level(i) == "risk"}

    @property
    def score(self) -> float:
        """The checkpoint's worst amplification of a rounding slip (0 when it has no norms)."""
        return max((s.score for stats in self.layers.values() for s in stats), default=0.0)

    def warnings(self) -> list[str]:
        out = []
        for layer, stats in sorted(self.layers.items()):
            for s in stats:
                if s.level != "ok":
                    where = "final norm" if layer < 0 else f"layer {layer}"
                    action = "keeps the unfused path" if s.level == "risk" else "stays fused"
                    out.append(f"{where}: {s.name} weight reaches {s.max_abs:.1f} "
                               f"(median {s.median_abs:.2f}); a rounding slip grows to {s.score:.3f}; "
                               f"{action}")
        return out

    def format(self) -> str:
        """The report ``braid check`` prints."""
        risky = sorted(self.risky_layers)
        lines = [f"fused-kernel compatibility: worst slip amplification {self.score:.3f} "
                 f"(warn at {WARN_WEIGHT * BF16_UNIT:.3f}, unfused at {RISK_WEIGHT * BF16_UNIT:.3f})"]
        for layer, stats in sorted(self.layers.items()):
            where = "final" if layer < 0 else f"layer {layer:3d}"
            worst = max(stats, key=lambda s: s.max_abs)
            lines.append(f"  {where}: {self.level(layer):4s} max |w| {worst.max_abs:7.2f} ({worst.name})")
        lines.append(f"unfused layers: {risky if risky else 'none'}")
        return "\n".join(lines)


def analyse_weights(named: Iterable[tuple[str, torch.Tensor]]) -> CompatReport:
    """Score the norm weights among ``(checkpoint name, tensor)`` pairs."""
    report = CompatReport()
    for name, tensor in named:
        m = _NORM.match(name)
        if m is None:
            continue
        w = tensor.detach().float().abs()
        layer = int(m.group(1)) if m.group(1) is not None else -1
        report.layers.setdefault(layer, []).append(
            NormStats(m.group(2), float(w.max()), float(w.median())))
    return report


def check_checkpoint(path: str | Path) -> CompatReport:
    """Analyse a checkpoint directory's safetensors without building the model.

    Example:
        >>> print(check_checkpoint("/tmp/tiny-qwen3").format())
    """
    from braid_engine.loader import iter_weights, load_config
    from braid_engine.models.registry import model_class

    # a model the engine cannot run is refused, as loading it is
    model_class(load_config(Path(path)).architecture)
    return analyse_weights(iter_weights(Path(path), keep=lambda name: name.endswith("norm.weight")))


def check_model(model: torch.nn.Module) -> CompatReport:
    """Analyse a loaded model's parameters (their names match the checkpoint's)."""
    return analyse_weights(model.named_parameters())
