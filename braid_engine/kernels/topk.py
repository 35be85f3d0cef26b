"""Each row's k-th largest value, for top-k sampling, in two kernels.

The sampler keeps a row's tokens whose scaled logit is at least its k-th largest (ties kept, as
transformers keeps them). ``torch.topk`` of the largest k asked gives that value, but on the GPU
it is a radix select of many small launches: ~340 µs of the host's time a step at batch 1 on an
H200 (``benchmarks/sampling.py``), which inside a decode burst lengthens every sampled step (616 µs
greedy, 938 µs with top-k and top-p, ``benchmarks/decode.py``). Here
program (row, chunk) sorts its chunk of 4,096 values and keeps the largest ``KEEP`` (the next
power of two of the largest k), and program (row) sorts the chunks' kept values and takes the one
at place k − 1: the same value as ``torch.topk``'s k-th (every value among a row's k largest is
among its chunk's k largest), ties counted as often as they occur.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096
# the largest k the kernels take: the second kernel sorts (chunks, rounded up to a power of two) ×
# KEEP values in one program; past it the sampler uses torch.topk
MAX_K = 64


@triton.jit
def _chunk_top_kernel(x_ptr, x_stride, part_ptr, n, CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                      KEEP: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    v = tl.load(x_ptr + row.to(tl.int64) * x_stride + idx, mask=idx < n, other=float("-inf"))
    top = tl.sort(v, descending=True)
    i = tl.arange(0, CHUNK)
    tl.store(part_ptr + (row * CHUNKS + c) * KEEP + i, top, mask=i < KEEP)


@triton.jit
def _kth_kernel(part_ptr, k_ptr, out_ptr, chunks, CHUNKS: tl.constexpr, KEEP: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, CHUNKS * KEEP)
    v = tl.load(part_ptr + row * CHUNKS * KEEP + i, mask=i < chunks * KEEP, other=float("-inf"))
    top = tl.sort(v, descending=True)
    k = tl.load(k_ptr + row)  # the k-th largest's place, k − 1; -1: the row keeps every token
    kth = tl.sum(tl.where(i == k, top, 0.0), axis=0)
    tl.store(out_ptr + row, tl.where(k >= 0, kth, float("-inf")))


def check_k_index(k_index: torch.Tensor, k_max: int) -> None:
    """Each row's place of its k-th largest, k − 1, lies in [-1, k_max − 1] (-1: no filter):
    checked where that costs no wait for the device (on the CPU)."""
    if k_index.device.type == "cpu" and k_index.numel() and not bool(((k_index >= -1) & (k_index < k_max)).all()):
        raise ValueError(f"k_index must lie in [-1, {k_max - 1}] (k_max {k_max}), got {k_index.tolist()}")


class KthLargest:
    """``torch.topk(x, k_max).values`` at each row's place ``k_index`` (-inf where it is -1), for
    rows of ``vocab`` float32 values and a largest k ≤ :data:`MAX_K`. ``chunk`` (a power of two,
    at least MAX_K): the values one program sorts (smaller for the CPU interpreter's tests)."""

    def __init__(self, rows: int, vocab: int, k_max: int, device: torch.device, chunk: int = CHUNK) -> None:
        if not 1 <= k_max <= MAX_K:
            raise ValueError(f"the kernels take a largest k of 1 to {MAX_K}, got {k_max}; use torch.topk")
        if chunk < MAX_K or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two of at least {MAX_K}, got {chunk}")
        self.k_max = k_max
        self.vocab, self.keep, self.chunk = vocab, triton.next_power_of_2(k_max), chunk
        self.chunks = triton.cdiv(vocab, self.chunk)
        self.width = triton.next_power_of_2(self.chunks)
        self.part = torch.full((rows * self.width * self.keep,), float("-inf"), device=device)

    def __call__(self, x: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
        """x [rows, vocab] float32 (unit stride along vocab), k_index [rows] int32 → [rows, 1]."""
        rows = x.shape[0]
        if (x.dim() != 2 or x.shape[1] != self.vocab or x.stride(1) != 1 or x.dtype != torch.float32
                or rows * self.width * self.keep > self.part.numel()):
            raise ValueError(f"x must be float32 [≤ {self.part.numel() // (self.width * self.keep)}, {self.vocab}] "
                             f"with unit stride along the vocabulary, got {x.dtype} {tuple(x.shape)}")
        if k_index.shape != (rows,) or k_index.dtype != torch.int32 or not k_index.is_contiguous():
            raise ValueError(f"k_index must be contiguous int32 [{rows}]")
        # places past k_max − 1 would read the chunks' kept values as if they were the row's (and
        # past them, 0.0)
        check_k_index(k_index, self.k_max)
        out = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
        _chunk_top_kernel[(rows, self.chunks)](x, x.stride(0), self.part, self.vocab, CHUNKS=self.width,
                                               CHUNK=self.chunk, KEEP=self.keep, num_warps=8)
        _kth_kernel[(rows,)](self.part, k_index, out, self.chunks, CHUNKS=self.width, KEEP=self.keep, num_warps=8)
        return out
