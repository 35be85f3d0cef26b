"""The many-row matmul kernel (kernels/gemm.py) against float64 products and against cuBLAS/torch
followed by the SiLU·mul kernel (interpreter on CPU, compiled on a Hopper GPU)."""

import pytest
import torch
import torch.nn.functional as F

from braid_engine.kernels import gemm
from braid_engine.kernels.activation import silu_and_mul

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# small tiles: several tiles each way, a K loop, a last row tile and K tile that overhang
SMALL = gemm.GemmConfig(16, 32, 32, 2, 4, 2)
# the same, persistent: a few programs walk the tiles
PERSISTENT = gemm.GemmConfig(16, 32, 32, 2, 4, 2, per_sm=1)

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9 or gemm.TensorDescriptor is None,
    reason="host tensor descriptors (TMA) need a Hopper GPU and a triton that has them")


def _inputs(device, dtype, m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g).to(device, dtype),
            (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [SMALL, PERSISTENT, None], ids=["small tiles", "persistent", "default"])
@pytest.mark.parametrize("m,n,k", [(40, 96, 80), (130, 64, 256)])
def test_matmul_is_the_product_rounded_once(device, dtype, config, m, n, k):
    x, w = _inputs(device, dtype, m, n, k, m + n + k)
    y = gemm.matmul(x, w) if config is None else gemm.matmul(x, w, config)
    exact = x.double() @ w.double().T
    scale = (x.double().abs() @ w.double().abs().T).max().item()
    assert y.shape == (m, n) and y.dtype == dtype
    assert (y.double() - exact).abs().max().item() <= scale * 4e-6 + torch.finfo(dtype).eps * exact.abs().max().item()
    if dtype != torch.float32:
        # a float32 sum in another order lands on the other side of a rounding boundary rarely
        assert (y != exact.to(dtype)).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [SMALL, PERSISTENT], ids=["small tiles", "persistent"])
@pytest.mark.parametrize("m,inter,k", [(40, 64, 80), (130, 96, 64)])
def test_gate_up_silu_matches_the_separate_kernels(device, dtype, config, m, inter, k):
    """SiLU·mul in the epilogue rounds gate, up, silu and the product as F.linear followed by the
    SiLU·mul kernel does: the same result but where a float32 sum order moved a rounding."""
    x, w = _inputs(device, dtype, m, 2 * inter, k, 7 * m + k)
    x = x * 3
    y = gemm.gate_up_silu(x, w, config)
    ref = silu_and_mul(F.linear(x, w))
    assert y.shape == (m, inter) and y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:
        assert (y != ref).float().mean().item() < 0.02
        torch.testing.assert_close(y.float(), ref.float(), rtol=4 * torch.finfo(dtype).eps, atol=1e-3)
    # the epilogue must pair each gate column with its own up column, not its neighbour's
    swapped = torch.cat([w[inter:], w[:inter]])
    assert not torch.allclose(gemm.gate_up_silu(x, swapped, config).float(), y.float(), atol=1e-2)


def test_gate_up_silu_refuses_a_tile_across_gate_and_up(device):
    x, w = _inputs(device, torch.float32, 8, 2 * 48, 64, 0)
    with pytest.raises(ValueError, match="multiple of BLOCK_N"):
        gemm.gate_up_silu(x, w, SMALL)


def test_supported_wants_aligned_rows_of_one_dtype(device):
    x, w = _inputs(device, torch.float16, 8, 32, 64, 0)
    assert gemm.supported(x, w)
    assert not gemm.supported(x, w.float())
    assert not gemm.supported(x[:, 1:], w[:, 1:])  # rows no longer start 16-byte aligned
    assert not gemm.supported(x.T, w)
