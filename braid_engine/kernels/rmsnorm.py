"""RMSNorm and residual-add + RMSNorm in one pass over each row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid_engine import kernels
from braid_engine.kernels import pdl_args


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, x_stride, res_stride, n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    # the weight is read before waiting for the kernel before (no kernel writes it)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    dtype = out_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        # the model-dtype add rounds once, as torch's ``x + residual`` does
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * n + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, axis=0) / n + eps)
    y = w.to(tl.float32) * h.to(dtype).to(tl.float32)
    tl.store(out_ptr + row * n + cols, y.to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` over the last dim, rounded as :func:`rms_norm_ref` rounds."""
    out, _ = _launch(x, None, weight, eps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass."""
    return _launch(x, residual, weight, eps)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        res, res_out = x2, out
    else:
        res = _rows(residual)
        res_out = torch.empty_like(out)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x2.shape[0],)](x2, res, weight, out, res_out, x2.stride(0), res.stride(0), n, eps,
                                     HAS_RESIDUAL=residual is not None, BLOCK=block,
                                     num_warps=min(max(block // 256, 1), 8),
                                     **(pdl_args(x.device) if kernels.PDL_RMS_NORM else {}))
    return out.view(x.shape), res_out.view(x.shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rms_norm_ref(h, weight, eps), h
