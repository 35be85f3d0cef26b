"""SiLU(gate) · up over the merged gate_up projection, without the intermediate tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def silu_mul(g, u, dtype: tl.constexpr):
    """SiLU(g)·u of model-dtype values (g in float32), rounded as torch rounds: silu's result to
    the model dtype before the multiply, then the product. Shared by every kernel that computes it."""
    s = (g / (1.0 + tl.exp(-g))).to(dtype)
    return (s.to(tl.float32) * u.to(tl.float32)).to(dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * x_stride + n + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n + cols, silu_mul(g, u, dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2n] = (gate, up) → silu(gate) * up [..., n]."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(n), 1024)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, x2.stride(0), n, BLOCK=block,
                                                                num_warps=4)
    return out.view(*x.shape[:-1], n)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
