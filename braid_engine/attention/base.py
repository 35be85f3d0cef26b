"""The attention backend interface: plan once per step for all layers, run per layer.

A step's batch is a list of sequences, each with ``query_len`` new tokens at the end of
``kv_len`` tokens of context, stored in pages listed by its page table. Sequences whose page
tables start with the same pages share that prefix physically; the plan may attend it once
for all of them (a cascade level) and merge with each sequence's own suffix by log-sum-exp.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class BatchLayout:
    query_lens: list[int]
    kv_lens: list[int]
    page_tables: list[list[int]]
    page_size: int
    slot_mapping: torch.Tensor  # [num_tokens] flat slot (page * page_size + offset) of each new token

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


@dataclass
class CascadeGroup:
    """Consecutive sequences ``[first, last)`` that share ``shared_pages`` leading pages."""

    first: int
    last: int
    shared_pages: list[int] = field(default_factory=list)


def shared_prefix_groups(layout: BatchLayout, min_shared_tokens: int) -> list[CascadeGroup]:
    """Groups of ≥2 consecutive sequences whose page tables share full leading pages that lie
    entirely before every query token of the group."""
    groups: list[CascadeGroup] = []
    n = len(layout.page_tables)
    i = 0
    while i < n:
        j = i + 1
        table0 = layout.page_tables[i]
        while j < n and table0 and layout.page_tables[j][:1] == table0[:1]:
            j += 1
        if j - i >= 2:
            limit = min(layout.kv_lens[s] - layout.query_lens[s] for s in range(i, j)) // layout.page_size
            common = 0
            while common < limit and all(
                len(layout.page_tables[s]) > common and layout.page_tables[s][common] == table0[common]
                for s in range(i + 1, j)
            ):
                common += 1
            if common and common * layout.page_size >= min_shared_tokens:
                groups.append(CascadeGroup(i, j, table0[:common]))
        i = j
    return groups


class AttentionBackend(ABC):
    """Chosen once at engine start. ``kv_cache`` is ``[layers, pages, 2, kv_heads, page_size, head_dim]``."""

    name: str = "base"

    def __init__(self, kv_cache: torch.Tensor, num_heads: int, head_dim: int, cascade: str = "auto") -> None:
        if cascade not in ("auto", "always", "never"):
            raise ValueError(f"cascade must be 'auto', 'always' or 'never', not {cascade!r}")
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.cascade = cascade
        self.groups: list[CascadeGroup] = []
        self.cascade_steps = 0  # steps planned with at least one cascade level
        self.layout: BatchLayout | None = None
        # this step attends the k/v each layer hands ``attend`` (a fresh prompt's own keys, laid
        # out contiguously), not the cache's copy of them
        self.own_kv = False

    @abstractmethod
    def plan(self, layout: BatchLayout) -> None:
        """Prepare everything the step's layers share (indices, masks, cascade levels)."""

    def warm_up(self) -> None:
        """Build or load, before the first request, whatever kernels a step may need; nothing
        here: the torch backend compiles nothing."""
        return None

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None = None,
               v: torch.Tensor | None = None) -> torch.Tensor:
        """Attend q [tokens, heads, dim] over ``kv_cache[layer]``, which already holds this
        step's k/v (a fused kernel may have written them). When ``own_kv`` is set the step's
        keys are all its own: the caller passes them as k, v [tokens, kv_heads, dim] too."""

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's k/v into ``kv_cache[layer]``, then attend. q: [tokens, heads, dim]."""
        self.write_kv(layer, k, v, self.layout.slot_mapping)
        return self.attend(layer, q, k, v)  # (k, v read there only when the step has ``own_kv``)

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        write_kv_cache(self.kv_cache[layer], k, v, slot_mapping)


def write_kv_cache(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [tokens, kv_heads, dim] at flat slots of one layer's HND pages.

    One row copy over a flat view: advanced indexing on (page, offset) around the heads axis
    would make torch copy the whole layer (hundreds of µs on an H100).
    """
    _, _, h, p, d = cache.shape
    page, off = slot_mapping // p, slot_mapping % p
    rows = (page[:, None] * (2 * h) + torch.arange(h, device=cache.device)[None, :]) * p + off[:, None]
    flat = cache.view(-1, d)
    flat.index_copy_(0, rows.reshape(-1), k.reshape(-1, d).to(cache.dtype))
    flat.index_copy_(0, (rows + h * p).reshape(-1), v.reshape(-1, d).to(cache.dtype))
