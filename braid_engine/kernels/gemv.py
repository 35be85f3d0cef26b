"""A one-row matmul y = x Wᵀ (+ b) for batch-1 decode steps.

At one row a decode step's projections are pure weight reads (2–12 MB each for Qwen3-0.6B),
and a general GEMM spends much of its time ramping up and down around them. This kernel gives
each program a few weight rows and walks the whole reduction, so every weight byte is read
once, in long contiguous runs. Products are accumulated in float32 and rounded once to the
output dtype, as cuBLAS does; only the order of the float32 sums differs.

Whether it beats cuBLAS depends on the card and shape, so :func:`linear` measures both once per
shape (outside any CUDA-graph capture) and keeps the faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
    for n, k, w in ((4, 256, 2), (4, 512, 4), (8, 256, 4), (8, 512, 4), (16, 256, 4), (2, 1024, 4))
]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    # elementwise products gathered per (output, lane), summed once at the end
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rk, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K"])(_gemv_kernel)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: dict | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]ᵀ (+ bias [N]) → [1, N] in x's dtype. ``config`` (BLOCK_N,
    BLOCK_K, num_warps) skips autotuning (the CPU interpreter's tests pass one)."""
    n, k = weight.shape
    if x.shape != (1, k) or not weight.is_contiguous():
        raise ValueError(f"gemv takes one row of {k} and a contiguous [N, K] weight; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    x = x.contiguous()
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else weight  # never read without HAS_BIAS
    if config is None:
        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        _tuned[grid](x, weight, b, y, n, k, HAS_BIAS=bias is not None)
    else:
        cfg = dict(config)
        warps = cfg.pop("num_warps", 4)
        _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](x, weight, b, y, n, k, HAS_BIAS=bias is not None,
                                                       num_warps=warps, **cfg)
    return y


# (N, K, dtype, device index) → whether the Triton kernel measured faster than cuBLAS
_faster: dict[tuple, bool] = {}


def _measure(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    from triton.testing import do_bench

    ours = do_bench(lambda: gemv(x, weight, bias), warmup=5, rep=20, return_mode="median")
    theirs = do_bench(lambda: F.linear(x, weight, bias), warmup=5, rep=20, return_mode="median")
    return ours < 0.95 * theirs


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, but a one-row CUDA input goes to :func:`gemv` where that measured faster
    for the shape. The first call of a shape measures (never during graph capture)."""
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_cuda or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    key = (*weight.shape, weight.dtype, x.device.index)
    faster = _faster.get(key)
    if faster is None:
        if torch.cuda.is_current_stream_capturing():
            return F.linear(x, weight, bias)
        faster = _faster[key] = _measure(x, weight, bias)
    return gemv(x, weight, bias) if faster else F.linear(x, weight, bias)


def shape_choices() -> dict[tuple, bool]:
    """What :func:`linear` chose per shape so far (for benchmarks and reports)."""
    return dict(_faster)
