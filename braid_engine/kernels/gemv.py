"""One-row matmuls for batch-1 decode (and a few rows at once for small batches), with the
small operation before each folded in.

At one token a step, each projection of a decode step is a pass over its weights (4–13 MB for
Qwen3-0.6B) and the kernels around it — RMSNorm, residual add, SiLU·mul — are a few µs of
launch and ramp each for a few KB of work. These kernels read the input row in every program
(it is a few KB and sits in L2), compute the operation before the matmul there, and give each
program a few whole weight rows, so a decoder layer runs four matmul kernels instead of eight
kernels around them, and no split-K reduction pass. On Hopper each kernel is launched as a
programmatic dependent of the one before: it reads its first weight tile (and the norm's weight)
while that one finishes, and waits for it only before reading the input row.

- :func:`norm_matmul`: (optional residual add →) RMSNorm → x Wᵀ; the input norms before
  qkv_proj and gate_up_proj. With ``silu_out`` (gate_up_proj, the engine's default through
  ``kernels.ROW_SILU_OUT``) each program takes gate rows and the up rows of the same columns and
  writes SiLU(gate)·up, so the SiLU·mul is computed once instead of in every down_proj program.
- :func:`silu_matmul`: SiLU(gate)·up → x Wᵀ; down_proj over a plain gate_up output.
- :func:`row_matmul`: x Wᵀ; o_proj, and down_proj after a ``silu_out`` gate_up.

A launch takes up to :data:`MAX_ROWS` input rows: each program reads its weight tile once and
multiplies it by every row in turn, each row with its own norm (the engine sends up to
``kernels.ROW_KERNEL_ROWS``; each further row adds its products and reductions to every program).

Every elementwise step rounds to the model dtype where PyTorch's unfused code does (the same
order as ``rmsnorm.py`` and ``activation.py``); products are summed in float32 and rounded once,
as cuBLAS does, so only the order of the float32 sums differs from ``F.linear``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from braid_engine.kernels import ROW_KERNEL_MAX_ROWS as MAX_ROWS
from braid_engine.kernels import pdl_args
from braid_engine.kernels.activation import silu_mul

PLAIN, NORM, SILU = 0, 1, 2
# elements of weight one program loads per step of its loop: enough bytes in flight per SM
# to keep the memory system busy, few enough registers to stay resident
_TILE = 8192


@triton.jit
def _prologue(x_ptr, r_ptr, nw, h_ptr, rk, k_ok, K, eps, pid, dtype: tl.constexpr,
              PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATHER: tl.constexpr = False):
    """The matmul's input for columns ``rk``, in float32, rounded as the unfused ops round; ``nw``:
    the norm weight's columns ``rk`` (read before the wait: no kernel writes it), for the norm.
    ``GATHER``: ``x_ptr`` is the row's embedding, which becomes the residual stream (``h_ptr``)."""
    if PROLOGUE == 1:
        # the whole row is in this tile: its RMS is needed before any product
        x = tl.load(x_ptr + rk, mask=k_ok, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + rk, mask=k_ok, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
            if pid == 0:
                tl.store(h_ptr + rk, x, mask=k_ok)
        elif GATHER:
            if pid == 0:
                tl.store(h_ptr + rk, x, mask=k_ok)
        h = x.to(tl.float32)
        h = h * tl.math.rsqrt(tl.sum(h * h, axis=0) / K + eps)
        a = (nw.to(tl.float32) * h.to(dtype).to(tl.float32)).to(dtype)
    elif PROLOGUE == 2:
        # x holds (gate, up) of K each; torch rounds silu's result before the multiply
        g = tl.load(x_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        a = silu_mul(g, tl.load(x_ptr + K + rk, mask=k_ok, other=0.0), dtype)
    else:
        a = tl.load(x_ptr + rk, mask=k_ok, other=0.0)
    return a.to(tl.float32)


@triton.jit
def _row_input(x_ptr, ids_ptr, m, M, width, GATHER: tl.constexpr):
    """Where input row m starts: row m of x, or with ``GATHER`` the embedding row of token ids[m]."""
    if GATHER:
        return x_ptr + tl.load(ids_ptr + m, mask=m < M, other=0).to(tl.int64) * width
    return x_ptr + m * width


@triton.jit
def _rows_times_tile(acc, w, x_ptr, ids_ptr, r_ptr, nw, h_ptr, rk, k_ok, M, K, eps, pid, dtype: tl.constexpr,
                     PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATHER: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """acc [ROWS, BLOCK_N] plus, in row m, the weight tile w [BLOCK_N, BLOCK_K] times the prologue
    of input row m (rows from M on are padding: nothing read, nothing stored)."""
    rm = tl.arange(0, ROWS)
    width = 2 * K if PROLOGUE == 2 else K
    for m in tl.static_range(ROWS):
        ok = k_ok & (tl.full([BLOCK_K], m, tl.int32) < M)
        a = _prologue(_row_input(x_ptr, ids_ptr, m, M, width, GATHER), r_ptr + m * K, nw, h_ptr + m * K, rk, ok,
                      K, eps, pid, dtype, PROLOGUE, HAS_RESIDUAL, GATHER)
        acc += tl.where(rm[:, None] == m, tl.sum(w.to(tl.float32) * a[None, :], axis=1)[None, :], 0.0)
    return acc


@triton.jit
def _silu_mul_pairs(y, dtype: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr, BY_ROW: tl.constexpr):
    """y [2·HALF] (or [ROWS, 2·HALF] where BY_ROW) in float32, gate outputs then the up outputs of
    the same columns → their SiLU(gate)·up, each rounded where the linear and the standalone kernel
    round."""
    y = y.to(dtype).to(tl.float32)
    if BY_ROW:
        g, u = tl.split(tl.permute(tl.reshape(y, [ROWS, 2, HALF]), [0, 2, 1]))
    else:
        g, u = tl.split(tl.permute(tl.reshape(y, [2, HALF]), [1, 0]))
    return silu_mul(g, u, dtype)


@triton.jit
def _row_matmul_kernel(x_ptr, ids_ptr, r_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, h_ptr, M, N, K, eps,
                       PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, ROWS: tl.constexpr,
                       SILU_OUT: tl.constexpr, GATHER: tl.constexpr):
    dtype = y_ptr.dtype.element_ty
    pid = tl.program_id(0)
    if USE_PDL:
        # the next kernel may start loading its weights: it waits for this one's output
        tl.extra.cuda.gdc_launch_dependents()
    # SILU_OUT: a gate_up weight (gate rows, then up rows): the program takes gate rows j… and the up
    # rows of the same j, so it can write SiLU(gate)·up for its HALF columns itself
    HALF: tl.constexpr = BLOCK_N // 2 if SILU_OUT else BLOCK_N
    out_n = pid * HALF + tl.arange(0, HALF)
    if SILU_OUT:
        i = tl.arange(0, BLOCK_N)
        j = pid * HALF + i % HALF
        rn = tl.where(i < HALF, j, N // 2 + j)
        n_ok = j < N // 2
    else:
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    k_ok = rk < K
    # the weights never depend on the previous kernel: the first tile is read before waiting, and
    # the norm's weight with it (read after the wait, its load came after the row's reduction:
    # a second trip to memory on the chain of waits)
    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
    if PROLOGUE == 1:  # the norm's tile spans K: these are all its columns
        nw = tl.load(nw_ptr + rk, mask=k_ok, other=0.0)
    else:
        nw = w_ptr  # unused
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if ROWS == 1:
        x_ptr = _row_input(x_ptr, ids_ptr, 0, M, K, GATHER)
        a = _prologue(x_ptr, r_ptr, nw, h_ptr, rk, k_ok, K, eps, pid, dtype, PROLOGUE, HAS_RESIDUAL, GATHER)
        acc = w.to(tl.float32) * a[None, :]
        # the loop holds registers even where one tile spans K, yet without it the matmuls were slower
        # on an H100 (docs/benchmarks.md, "without their K-tile loop")
        for k0 in range(BLOCK_K, K, BLOCK_K):  # only where K exceeds one tile (never with the norm)
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            a = _prologue(x_ptr, r_ptr, nw, h_ptr, rk, k_ok, K, eps, pid, dtype, PROLOGUE, HAS_RESIDUAL, GATHER)
            acc += w.to(tl.float32) * a[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if SILU_OUT:
            tl.store(y_ptr + out_n, _silu_mul_pairs(y, dtype, HALF, ROWS, False), mask=out_n < N // 2)
        else:
            tl.store(y_ptr + rn, y.to(dtype), mask=n_ok)
    else:
        # a few rows (a small decode batch, padded to ROWS): each weight tile is read once and
        # multiplied by every row
        acc = _rows_times_tile(tl.zeros([ROWS, BLOCK_N], dtype=tl.float32), w, x_ptr, ids_ptr, r_ptr, nw, h_ptr,
                               rk, k_ok, M, K, eps, pid, dtype, PROLOGUE, HAS_RESIDUAL, GATHER, ROWS, BLOCK_K)
        for k0 in range(BLOCK_K, K, BLOCK_K):  # only where K exceeds one tile (never with the norm)
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _rows_times_tile(acc, w, x_ptr, ids_ptr, r_ptr, nw, h_ptr, rk, k_ok, M, K, eps, pid, dtype,
                                   PROLOGUE, HAS_RESIDUAL, GATHER, ROWS, BLOCK_K)
        rm = tl.arange(0, ROWS)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SILU_OUT:
            tl.store(y_ptr + rm[:, None] * (N // 2) + out_n[None, :], _silu_mul_pairs(acc, dtype, HALF, ROWS, True),
                     mask=(rm[:, None] < M) & (out_n < N // 2)[None, :])
        else:
            tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(dtype), mask=(rm[:, None] < M) & n_ok[None, :])


@functools.cache
def default_config(n: int, k: int, prologue: int) -> dict:
    """Block sizes for an [n, k] weight: the norm prologue needs the whole row in one tile,
    which past 2,048 columns takes 8 warps (with 4, registers spill at 4,096). Callers copy it."""
    block_k = triton.next_power_of_2(k) if prologue == NORM else min(triton.next_power_of_2(k), 4096)
    warps = 8 if prologue == NORM and block_k > 2048 else 4
    return {"BLOCK_N": max(1, _TILE // block_k), "BLOCK_K": block_k, "num_warps": warps}


def _launch(prologue: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
            eps: float = 0.0, config: dict | None = None,
            silu_out: bool = False, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, k = weight.shape
    if silu_out and n % 2:
        raise ValueError(f"a SiLU·mul output needs gate and up rows of equal count; the weight has {n} rows")
    width = 2 * k if prologue == SILU else k
    x = x.contiguous()
    if ids is not None:  # x is an embedding table, the input rows its rows ids
        if prologue != NORM or residual is not None or ids.dim() != 1 or ids.dtype != torch.int64:
            raise ValueError("embedding rows are gathered only before a norm without a residual, by int64 ids [rows]")
        if x.dim() != 2 or x.shape[1] != width:
            raise ValueError(f"the embedding table must be [vocab, {width}], got {tuple(x.shape)}")
        ids = ids.contiguous()
    m = (ids.shape[0] if ids is not None else x.shape[0]) if x.dim() == 2 else 0
    if x.shape[1:] != (width,) or not 1 <= m <= MAX_ROWS or not weight.is_contiguous():
        raise ValueError(f"one-row matmul takes a contiguous [rows, {width}] input of 1 to {MAX_ROWS} rows and an "
                         f"[N, K] weight; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if residual is not None:
        residual = residual.contiguous()
        if residual.shape != x.shape:
            raise ValueError(f"the residual must match the input {tuple(x.shape)}, got {tuple(residual.shape)}")
    y = torch.empty((m, n // 2 if silu_out else n), dtype=x.dtype, device=x.device)
    # the residual stream after this kernel: x + residual, or the gathered embedding rows
    h = torch.empty((m, width), dtype=x.dtype, device=x.device) if residual is not None or ids is not None else None
    args = (x, ids if ids is not None else x, residual if residual is not None else x,
            norm_weight if norm_weight is not None else x, weight, bias if bias is not None else weight, y,
            h if h is not None else y, m, n, k, eps)
    flags = {"PROLOGUE": prologue, "HAS_RESIDUAL": residual is not None, "HAS_BIAS": bias is not None,
             "GATHER": ids is not None, **pdl_args(x.device)}
    cfg = dict(config or default_config(n, k, prologue))
    if prologue == NORM and cfg["BLOCK_K"] < k:
        raise ValueError(f"the norm prologue needs the whole row in one tile: BLOCK_K ≥ {k}")
    warps = cfg.pop("num_warps")
    if silu_out:  # a program's rows: half gate, half up
        cfg["BLOCK_N"] = max(2, cfg["BLOCK_N"])
        grid = triton.cdiv(n // 2, cfg["BLOCK_N"] // 2)
    else:
        grid = triton.cdiv(n, cfg["BLOCK_N"])
    _row_matmul_kernel[(grid,)](*args, ROWS=triton.next_power_of_2(m), num_warps=warps, SILU_OUT=silu_out,
                                **cfg, **flags)
    return y, h


def silu_out_fits(weight: torch.Tensor) -> bool:
    """Whether a gate_up ``weight`` takes ``norm_matmul(silu_out=True)`` at its default tile: a
    program needs a gate and an up row, and where the norm's whole-row tile holds one row (hidden
    size past 4,096) a second one spills registers (255 and a stack on sm_90 at 8,192)."""
    return default_config(weight.shape[0], weight.shape[1], NORM)["BLOCK_N"] >= 2


def row_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               config: dict | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]ᵀ (+ bias) → [M, N], M ≤ :data:`MAX_ROWS`."""
    return _launch(PLAIN, x, weight, bias, config=config)[0]


def norm_matmul(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: dict | None = None, silu_out: bool = False,
                ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) @ weightᵀ (+ bias), x + residual); without a residual the
    second item is x itself, as the layer's first norm returns it. ``silu_out``: the weight is a
    gate_up projection's (gate rows, then up rows) and the first item SiLU(gate)·up [M, N/2], as
    the standalone kernel after the matmul gives it. ``ids`` (no residual): x is an embedding
    table and the input rows are x[ids], gathered in the kernel; the second item is those rows."""
    y, h = _launch(NORM, x, weight, bias, residual, norm_weight, eps, config, silu_out=silu_out, ids=ids)
    return y, (h if h is not None else x)


def silu_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """x [M, 2K] = (gate, up) → (silu(gate) · up) @ weight [N, K]ᵀ (+ bias) → [M, N]."""
    return _launch(SILU, x, weight, bias, config=config)[0]
