"""Greedy tokens from the LM head's logits, written where the next decode step reads its input.

A decode graph ends by picking each row's greedy token and copying it into the ids the next
replay embeds. In torch that is the logits' float copy, ``argmax`` (a reduction whose blocks meet
through buffers it clears first) and a copy: four or five small kernels, ~23 µs of a 623 µs step at
batch 1 on an H200 (`benchmarks/graph_timeline.py`). Here it is two kernels over the model-dtype
logits (the float copy changes no value, so it changes no argmax): program (row, chunk) finds its
chunk's largest value and its first index, and program (row) takes the first of the chunks' and
writes it, as int64, into ``out``.

The token is ``torch.argmax``'s exactly: the first index of the largest value, and where the row
holds a NaN, the first NaN's index (torch ranks NaN above every number).

The same kernels draw a sampled step's tokens (``race``): the argmax of ``x / T − log E`` with
``E ~ Exp(1)`` drawn by torch beside the logits, the exponential race (Gumbel-max) that
``sampling.RowSampler`` runs, in one pass over the logits instead of the five or six torch
kernels of its float copy, temperature, logarithm, subtraction and argmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid_engine.kernels import pdl_args

# a chunk's elements: one tile a program, ~37 programs a row for a vocabulary of 151,936
CHUNK = 4096


_NONE = tl.constexpr(2147483647)  # an index past any vocabulary: no such element


@triton.jit
def _first_largest(v, idx, ok):
    """Over the elements where ``ok``: the index of the first NaN (``_NONE`` if there is none), the
    largest other value, and the first index holding it (torch ranks NaN above every number)."""
    nan = (v != v) & ok
    first_nan = tl.min(tl.where(nan, idx, _NONE), axis=0)
    best = tl.max(tl.where(nan, float("-inf"), v), axis=0)
    return first_nan, best, tl.min(tl.where(ok & (v == best), idx, _NONE), axis=0)


@triton.jit
def _chunk_kernel(x_ptr, x_stride, e_ptr, e_stride, t_ptr, cut_val_ptr, cut_idx_ptr, part_val_ptr, part_idx_ptr, n,
                  CHUNKS: tl.constexpr, CHUNK: tl.constexpr, RACE: tl.constexpr, TEMPERATURE: tl.constexpr,
                  CUT: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    idx = c * CHUNK + tl.arange(0, CHUNK)
    ok = idx < n
    v = tl.load(x_ptr + row.to(tl.int64) * x_stride + idx, mask=ok, other=float("-inf")).to(tl.float32)
    if RACE:
        if TEMPERATURE:  # divided, as torch divides (not times a reciprocal)
            v = tl.math.div_rn(v, tl.load(t_ptr + row))
        if CUT:  # the row's keep rule (kernels/topp.py): what it drops is -inf, as torch's masked_fill makes it
            cut_val = tl.load(cut_val_ptr + row)
            v = tl.where((v < cut_val) | ((v == cut_val) & (idx < tl.load(cut_idx_ptr + row))), float("-inf"), v)
        v = v - tl.log(tl.load(e_ptr + row.to(tl.int64) * e_stride + idx, mask=ok, other=1.0))
    first_nan, best, first_best = _first_largest(v, idx, ok)
    has_nan = first_nan < _NONE
    # a chunk with a NaN hands on its first NaN (its value NaN); otherwise its largest value
    tl.store(part_val_ptr + row * CHUNKS + c, tl.where(has_nan, float("nan"), best))
    tl.store(part_idx_ptr + row * CHUNKS + c, tl.where(has_nan, first_nan, first_best))


@triton.jit
def _rows_kernel(part_val_ptr, part_idx_ptr, out_ptr, out_stride, chunks, CHUNKS: tl.constexpr,
                 USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    c = tl.arange(0, CHUNKS)
    ok = c < chunks
    v = tl.load(part_val_ptr + row * CHUNKS + c, mask=ok, other=float("-inf"))
    i = tl.load(part_idx_ptr + row * CHUNKS + c, mask=ok, other=0)
    # the chunks' indices rise with the chunk: the first NaN chunk's index is the row's first NaN,
    # and the least index among the chunks holding the largest value is the row's first maximum
    first_nan, _, first_best = _first_largest(v, i, ok)
    tl.store(out_ptr + row * out_stride, tl.where(first_nan < _NONE, first_nan, first_best).to(tl.int64))


class GreedyIds:
    """``torch.argmax(logits, -1)`` written into ``out``, for up to ``max_rows`` rows of a
    ``vocab``-wide logits tensor; the chunks' partial results live in buffers made once, so the
    launches can be captured in a CUDA graph."""

    DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the logits' it takes

    def __init__(self, max_rows: int, vocab: int, device: torch.device) -> None:
        self.vocab = vocab
        self.chunks = triton.cdiv(vocab, CHUNK)
        self.width = triton.next_power_of_2(self.chunks)
        self.part_val = torch.empty(max_rows * self.width, dtype=torch.float32, device=device)
        self.part_idx = torch.empty(max_rows * self.width, dtype=torch.int32, device=device)

    def __call__(self, logits: torch.Tensor, out: torch.Tensor, race: torch.Tensor | None = None,
                 temperature: torch.Tensor | None = None,
                 cut: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """logits [rows, vocab] (unit stride along vocab); out [rows] int64 (any stride) → out.
        ``race`` (float32, as logits): the argmax of ``logits / temperature − log(race)`` instead,
        with ``temperature`` float32 [rows] (None: the logits are already scaled). ``cut`` (with a
        race): each row's keep rule from ``kernels/topp.py``, (value float32 [rows], index int32
        [rows]): the scaled logits it drops (below the value, or equal to it before the index) are
        -inf in the race."""
        rows = logits.shape[0]
        if (logits.dim() != 2 or logits.shape[1] != self.vocab or logits.stride(1) != 1
                or rows * self.width > self.part_val.numel()):
            raise ValueError(f"logits must be [≤ {self.part_val.numel() // self.width}, {self.vocab}] with unit "
                             f"stride along the vocabulary, got {tuple(logits.shape)}")
        if logits.dtype not in self.DTYPES:
            raise ValueError(f"logits must be float32, float16 or bfloat16 (compared in float32), got {logits.dtype}")
        if out.shape != (rows,) or out.dtype != torch.int64:
            raise ValueError(f"out must be [{rows}] int64, got {tuple(out.shape)} {out.dtype}")
        if race is not None and (race.shape != logits.shape or race.dtype != torch.float32 or race.stride(1) != 1):
            raise ValueError(f"race must be float32 {tuple(logits.shape)} with unit stride along the vocabulary, got "
                             f"{race.dtype} {tuple(race.shape)}")
        if temperature is not None and (race is None or temperature.shape != (rows,)
                                        or temperature.dtype != torch.float32 or not temperature.is_contiguous()):
            raise ValueError(f"temperature goes with a race and must be contiguous float32 [{rows}]")
        if cut is not None and (race is None or len(cut) != 2 or any(
                c.shape != (rows,) or c.dtype != d or not c.is_contiguous()
                for c, d in zip(cut, (torch.float32, torch.int32)))):
            raise ValueError(f"cut goes with a race and must be contiguous (float32, int32) [{rows}]")
        pdl = pdl_args(logits.device)
        _chunk_kernel[(rows, self.chunks)](logits, logits.stride(0), race if race is not None else logits,
                                           race.stride(0) if race is not None else 0,
                                           temperature if temperature is not None else logits,
                                           cut[0] if cut is not None else logits, cut[1] if cut is not None else logits,
                                           self.part_val, self.part_idx, self.vocab, CHUNKS=self.width, CHUNK=CHUNK,
                                           RACE=race is not None, TEMPERATURE=temperature is not None,
                                           CUT=cut is not None, num_warps=8,
                                           **pdl)
        _rows_kernel[(rows,)](self.part_val, self.part_idx, out, out.stride(0), self.chunks, CHUNKS=self.width,
                              num_warps=1, **pdl)
        return out
