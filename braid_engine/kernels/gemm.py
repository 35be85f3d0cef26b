"""Many-row matmuls (prompt steps) with the SiLU·mul after gate_up folded in.

A 4k-token prompt through Qwen3-0.6B spends ~0.7 ms of its ~11.5 ms graph in the SiLU·mul
kernel: it reads gate_up's 50 MB output back and writes 25 MB a layer. :func:`gate_up_silu`
computes the gate and up tiles of the same output columns in one program (two accumulators
over the same input tile) and writes only SiLU(gate)·up, so gate_up's output never reaches
memory. :func:`matmul` is the same kernel without the epilogue, to time against cuBLAS.

Weights stay as ``nn.Linear`` holds them, ``[N, K]`` with K contiguous; on Hopper the tiles
come in through the TMA (tensor descriptors). The epilogue rounds gate and up to the model dtype
first and then as ``activation.py`` does, so the only difference from cuBLAS + the SiLU·mul
kernel is the order of the float32 sums.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older triton: no host-side descriptors, cuBLAS and the SiLU kernel instead
    TensorDescriptor = None


@triton.jit
def _gemm_kernel(a_desc, w_desc, c_desc, M, N, K, up_offset,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 SILU: tl.constexpr, STAGES: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                 PRECISION: tl.constexpr):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    dtype = c_desc.dtype
    # fewer programs than tiles: each takes every num_programs-th tile, and (FLATTEN) the loads of
    # its next tile start while this one's epilogue runs
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, tl.num_programs(0), flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        # tiles in groups of GROUP_M row tiles walk the column tiles together, so a group's
        # weight tiles are read from L2 by its other members
        first_m = (tile // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        om = (first_m + (tile % per_group) % group_m) * BLOCK_M
        on = ((tile % per_group) // group_m) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SILU:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            a = a_desc.load([om, k])
            acc = tl.dot(a, w_desc.load([on, k]).T, acc, input_precision=PRECISION)
            if SILU:
                acc_up = tl.dot(a, w_desc.load([up_offset + on, k]).T, acc_up, input_precision=PRECISION)
        if SILU:
            # cuBLAS rounds gate and up to the model dtype; torch rounds silu's result before the multiply
            g = acc.to(dtype).to(tl.float32)
            s = (g / (1.0 + tl.exp(-g))).to(dtype)
            out = (s.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
        else:
            out = acc.to(dtype)
        c_desc.store([om, on], out)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    warps: int
    stages: int
    per_sm: int = 0  # programs an SM, each walking several tiles; 0: one program a tile
    warp_specialize: bool = False  # loads in warps of their own (persistent only)

    def __str__(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} w{self.warps} s{self.stages}"
                + (f" {self.per_sm}/SM" if self.per_sm else "") + (" ws" if self.warp_specialize else ""))


# the silu form carries two accumulators
PLAIN_CONFIG = GemmConfig(128, 256, 64, 8, 8, 3)
SILU_CONFIG = GemmConfig(128, 128, 64, 8, 8, 3)


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether these kernels can take x and weight: host tensor descriptors, rows that start 16-byte aligned."""
    if TensorDescriptor is None or x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16,
                                                                                  torch.float32):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    size = x.element_size()
    return (x.dim() == 2 and all(t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0
                                 for t in (x, weight)))


def _launch(x: torch.Tensor, weight: torch.Tensor, n: int, silu: bool, config: GemmConfig) -> torch.Tensor:
    bm, bn, bk, group, warps, stages, per_sm, ws = config
    m, k = x.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    a_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(weight, [bn, bk])
    c_desc = TensorDescriptor.from_tensor(out, [bm, bn])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if per_sm and x.device.type == "cuda":
        tiles = min(tiles, per_sm * _sms(x.device.index if x.device.index is not None else torch.cuda.current_device()))
    elif per_sm:
        tiles = min(tiles, per_sm * 2)  # the interpreter: a few programs, several tiles each
    # float32 inputs: full-precision products, not TF32
    _gemm_kernel[(tiles,)](a_desc, w_desc, c_desc, m, n, k, n, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group,
                           SILU=silu, STAGES=stages, FLATTEN=bool(per_sm), WARP_SPECIALIZE=ws,
                           PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps)
    return out


def matmul(x: torch.Tensor, weight: torch.Tensor, config: GemmConfig = PLAIN_CONFIG) -> torch.Tensor:
    """x [M, K] · weight [N, K]ᵀ → [M, N], as ``F.linear`` without bias."""
    return _launch(x, weight, weight.shape[0], False, config)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, config: GemmConfig = SILU_CONFIG) -> torch.Tensor:
    """SiLU(x · gateᵀ) · (x · upᵀ) [M, n] where weight [2n, K] stacks gate's rows on up's."""
    n = weight.shape[0] // 2
    if n % config[1]:
        raise ValueError(f"gate_up_silu needs the intermediate size ({n}) to be a multiple of BLOCK_N "
                         f"({config[1]}): a column tile must not cross from gate into up")
    return _launch(x, weight, n, True, config)


def gate_up_silu_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, weight).chunk(2, dim=-1)
    return F.silu(gate) * up
