"""Each Triton kernel against its torch reference (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch

from braid_engine.kernels.activation import silu_and_mul, silu_and_mul_ref
from braid_engine.kernels.qk_norm_rope import qk_norm_rope_write_kv, qk_norm_rope_write_kv_ref
from braid_engine.kernels.rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from braid_engine.models.layers import RotaryEmbedding

# float32 reductions may add in another order; that moves the last bit of a float32 result,
# and in float16 flips the rounding of a rare element by one unit
# bfloat16 only compiled: the interpreter computes it wrongly
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        ulp = torch.finfo(a.dtype).eps * b.float().abs().clamp_min(1.0)
        assert ((a.float() - b.float()).abs() <= ulp).all()
        assert (a != b).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 96])
def test_rms_norm(device, dtype, n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, n, generator=g).to(device, dtype)
    w = (0.5 + torch.rand(n, generator=g)).to(device, dtype)
    _close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(device, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, generator=g).to(device, dtype)
    r = torch.randn(4, 3, 64, generator=g).to(device, dtype)
    w = (torch.rand(64, generator=g) * 4).to(device, dtype)
    out, res = add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_res = add_rms_norm_ref(x, r, w, 1e-5)
    assert torch.equal(res, ref_res)
    _close(out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(device, dtype):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 2 * 80, generator=g) * 3).to(device, dtype)
    _close(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
def test_qk_norm_rope_write_kv(device, dtype, norm):
    g = torch.Generator().manual_seed(3)
    hq, hkv, d, ps, pages, t = 4, 2, 32, 4, 6, 7
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(device, dtype)
    qw = (0.5 + torch.rand(d, generator=g)).to(device, dtype) if norm else None
    # k_norm weights as large as Qwen3-0.6B's (96.5) make any rounding slip visible
    kw = (torch.rand(d, generator=g) * 96.5).to(device, dtype) if norm else None
    rope = RotaryEmbedding(d, 1e6, 64, interleaved=False).to(device)
    positions = torch.tensor([0, 1, 2, 9, 10, 33, 63], device=device)
    slots = torch.randperm(pages * ps, generator=g)[:t].to(device)
    caches = [torch.zeros(pages, 2, hkv, ps, d, dtype=dtype, device=device) for _ in range(2)]
    q = qk_norm_rope_write_kv(qkv, positions, qw, kw, 1e-6, rope.cos, rope.sin, caches[0], slots, hq, hkv)
    q_ref = qk_norm_rope_write_kv_ref(qkv, positions, qw, kw, 1e-6, rope.cos, rope.sin, caches[1],
                                      slots, hq, hkv)
    _close(q, q_ref)
    _close(caches[0], caches[1])
    assert caches[0][:, 1].abs().sum() > 0

