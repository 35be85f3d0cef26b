"""One-row matmuls whose weights are asked for before their input exists (Hopper, CUDA C++).

The Triton row kernels (``gemv.py``) stream a decode step's weights at ~2.0 TB/s: each program
reads one tile and ends, so between waves, and across each kernel boundary, an SM has little in
flight. ``csrc/row_stream.cu`` gives each block one contiguous run of rows (at most
:data:`BLOCK_BYTES`; Qwen3-0.6B's projections take one block an SM) and has it ask the copy
engine for all of them into shared memory as its first act, and read the norm weights, before it
waits for the kernel before it (programmatic dependent launch). The next matmul's weights thus
land while this one, or the attention between two matmuls, is still running; after the wait a
block makes one round trip to memory (the input row), then works from shared memory.

The source is compiled on first use with torch's extension builder (nvcc, for sm_90a), and
only there: elsewhere, or where the build fails, :func:`available` is False and the Triton
kernels run. Same prologues and roundings as ``gemv.py``.
"""

from __future__ import annotations

import functools
import pathlib
import warnings

import torch

from braid_engine.kernels.gemv import NORM, PLAIN, SILU

_SOURCE = pathlib.Path(__file__).with_name("csrc") / "row_stream.cu"
# weight bytes a block holds in shared memory: this matmul's block and the next one's fit an SM
BLOCK_BYTES = 48 * 1024
# weight bytes behind one mbarrier: a warp starts on its rows once their piece has landed
PIECE_BYTES = 16 * 1024
_MAX_PIECES = 16
# threads a block (512 or 1024); a thread holds at most 8 of the input row's elements
THREADS = 1024

__all__ = ["NORM", "PLAIN", "SILU", "available", "layout", "launch"]


@functools.cache
def _module():
    from torch.utils.cpp_extension import load

    return load(name="braid_row_stream", sources=[str(_SOURCE)],
                extra_cuda_cflags=["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)


@functools.cache
def _usable(index: int) -> bool:
    if torch.cuda.get_device_capability(index) != (9, 0):
        return False  # the code is built for sm_90a alone
    try:
        _module()
    except Exception as e:  # no nvcc, a failed build: the Triton kernels serve
        warnings.warn(f"the streaming row kernels could not be built ({type(e).__name__}: {e}); "
                      "decode uses the Triton row kernels", stacklevel=2)
        return False
    return True


def available(device: torch.device) -> bool:
    """Whether this device runs the streaming kernels (a Hopper GPU where the source built)."""
    if device.type != "cuda":
        return False
    return _usable(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def layout(n: int, k: int, itemsize: int, sms: int, block_bytes: int = BLOCK_BYTES,
           piece_bytes: int = PIECE_BYTES) -> tuple[int, int]:
    """(rows a block, rows a piece) for an [n, k] weight: the rows spread over the SMs, no
    block past ``block_bytes``, pieces of about ``piece_bytes``, at most 16 a block."""
    row = k * itemsize
    rows = max(1, min(-(-n // sms), block_bytes // row))
    piece = max(1, min(rows, piece_bytes // row), -(-rows // _MAX_PIECES))
    return rows, piece


def supports(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether the kernels take these: float16/bfloat16, rows of whole 16-byte vectors no wider
    than 8 elements a thread, weights 16-byte aligned (the copy engine's unit), on a device they
    run on."""
    k = weight.shape[1]
    return (x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16) and k % 8 == 0
            and k <= 8 * THREADS and weight.is_contiguous() and weight.data_ptr() % 16 == 0
            and all(t.is_contiguous() for t in (x, *others) if t is not None)
            and available(x.device))


def launch(prologue: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float, pdl: bool = True,
           block_bytes: int = BLOCK_BYTES, piece_bytes: int = PIECE_BYTES, threads: int = THREADS,
           only_load: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y [1, N] and (NORM with a residual) h = x + residual, as ``gemv._launch`` returns them.
    The caller has checked the shapes (``gemv._launch``) and :func:`supports`. ``only_load``
    (a measurement): the weights' copies alone, nothing computed."""
    n, k = weight.shape
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    rows, piece = layout(n, k, weight.element_size(), _sms(index), block_bytes, piece_bytes)
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x) if residual is not None else None
    _module().row_stream(x, residual, norm_weight, weight, bias, y, h, prologue, eps, rows, piece, pdl, threads,
                         int(only_load))
    return y, h
