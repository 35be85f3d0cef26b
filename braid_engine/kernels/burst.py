"""A decode burst's step-to-step bookkeeping inside the decode graph.

A burst replays one decode graph several times in a row, each replay one token further on: its
rows' positions and KV slots move by one, the attention's last-page fill (or key count) too, and
each replay's greedy tokens are kept for the host to read at the end. Done from the host, that is
three small copies between replays (~14 µs a step on an H200, outside the graph). Here the host
writes every step's inputs once per burst into :attr:`BurstSteps.table`, and the graph does the
rest: its first kernel (:meth:`BurstSteps.advance`) loads the inputs of the step it is at and
counts it, and the greedy-token kernel (``kernels/argmax.py``) also writes its tokens into that
step's row of :attr:`BurstSteps.out`.

``table`` starts with the state ``(next step, steps, this replay's step or -1, 0)``; a replay
outside a burst finds ``next step == steps`` and leaves every input as the host loaded it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

STATE = 4  # the state's entries, ahead of the steps' inputs in the table


@triton.jit
def _advance_kernel(table_ptr, pos_ptr, slot_ptr, fill_ptr, base_ptr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_BASE: tl.constexpr, STATE: tl.constexpr):
    k = tl.load(table_ptr)
    steps = tl.load(table_ptr + 1)
    if k < steps:
        i = tl.arange(0, BLOCK)
        ok = i < ROWS
        step = table_ptr + STATE + k * 3 * ROWS
        tl.store(pos_ptr + i, tl.load(step + i, mask=ok), mask=ok)
        tl.store(slot_ptr + i, tl.load(step + ROWS + i, mask=ok), mask=ok)
        fill = tl.load(step + 2 * ROWS + i, mask=ok).to(tl.int32)
        if HAS_BASE:
            fill += tl.load(base_ptr + i, mask=ok)
        tl.store(fill_ptr + i, fill, mask=ok)
        tl.store(table_ptr, k + 1)
        tl.store(table_ptr + 2, k)
    else:
        tl.store(table_ptr + 2, -1)


class BurstSteps:
    """The device buffers of bursts of up to ``max_steps`` steps over up to ``max_rows`` graph rows."""

    def __init__(self, max_steps: int, max_rows: int, device: torch.device) -> None:
        self.max_steps = max_steps
        self.max_rows = max_rows
        self.table = torch.zeros(STATE + max_steps * 3 * max_rows, dtype=torch.int64, device=device)
        self.out = torch.zeros(max_steps * max_rows, dtype=torch.int64, device=device)

    def advance(self, positions: torch.Tensor, slots: torch.Tensor, fill: torch.Tensor,
                base: torch.Tensor | None = None) -> None:
        """Queue the kernel that, inside a burst, writes the current step's positions, slots and
        fill (``base`` + the step's fill, where the attention reads key counts) for ``len(positions)``
        rows, and counts the step. ``positions``, ``slots``: int64 [rows]; ``fill``, ``base``: int32 [rows]."""
        rows = positions.shape[0]
        if rows > self.max_rows or not (slots.shape == fill.shape == (rows,)) or (base is not None and base.shape != (rows,)):
            raise ValueError(f"a burst step moves 1 to {self.max_rows} rows, one entry each in positions, slots, "
                             f"fill and base; got {rows} positions, slots {tuple(slots.shape)}, fill {tuple(fill.shape)}")
        if positions.dtype != torch.int64 or slots.dtype != torch.int64 or fill.dtype != torch.int32:
            raise ValueError("positions and slots must be int64, fill (and base) int32")
        if not (positions.is_contiguous() and slots.is_contiguous() and fill.is_contiguous()):
            raise ValueError("positions, slots and fill must be contiguous")
        _advance_kernel[(1,)](self.table, positions, slots, fill, base if base is not None else fill, ROWS=rows,
                              BLOCK=triton.next_power_of_2(rows), HAS_BASE=base is not None, STATE=STATE, num_warps=1)

    def host_table(self, positions: list[list[int]], slots: list[list[int]], fills: list[list[int]]) -> torch.Tensor:
        """A burst's table as the host builds it: ``positions[k][i]`` etc. for step k and graph row i
        (every step the same rows), the state set to its first step."""
        steps = len(positions)
        if not 1 <= steps <= self.max_steps or not (len(slots) == len(fills) == steps):
            raise ValueError(f"a burst takes 1 to {self.max_steps} steps, each with positions, slots and fills; "
                             f"got {steps}, {len(slots)}, {len(fills)}")
        flat = [0, steps, -1, 0]
        for p, s, f in zip(positions, slots, fills, strict=True):
            flat += p + s + f
        if len(flat) != STATE + steps * 3 * len(positions[0]) or len(positions[0]) > self.max_rows:
            raise ValueError(f"every step needs one position, slot and fill for each of up to {self.max_rows} rows")
        return torch.tensor(flat, dtype=torch.int64)

    def load(self, table: torch.Tensor) -> None:
        """Queue the copy of a host table (``host_table``) into the device's: the next replays run its steps."""
        self.table[:table.numel()].copy_(table, non_blocking=True)

    def tokens(self, steps: int, rows: int) -> torch.Tensor:
        """[steps, rows]: the greedy tokens of a burst's steps (a view, valid until the next burst writes)."""
        return self.out[:steps * rows].view(steps, rows)
