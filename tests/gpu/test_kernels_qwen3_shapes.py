"""The Triton kernels in bf16 at Qwen3-0.6B shapes, decode and prefill (GPU only).

Equal to torch except where float32 sums add in another order: such a slip moves an element by
one bf16 unit, and it must stay rare.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from braid_engine.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from braid_engine.kernels.qk_norm_rope import (  # noqa: E402
    qk_norm_rope_write_kv,
    qk_norm_rope_write_kv_ref,
)
from braid_engine.kernels.rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from braid_engine.models.layers import RotaryEmbedding  # noqa: E402

DEV = torch.device("cuda")
BF16 = torch.bfloat16


def _one_unit_rarely(a: torch.Tensor, b: torch.Tensor, weight_max: float = 1.0) -> float:
    """Assert a and b differ by at most one bf16 unit (times the weight) and rarely; return the
    fraction of elements that differ."""
    diff = (a.float() - b.float()).abs()
    # RoPE mixes two elements, so a slip is one unit of the inputs' scale, not the output's
    unit = 2.0 ** -7 * b.float().abs().clamp_min(1.0)
    assert (diff <= unit * max(weight_max, 1.0) * 1.01).all(), f"max diff {diff.max():.3g}"
    frac = (a != b).float().mean().item()
    assert frac < 1e-3, f"{frac:.2e} of elements differ"
    return frac


@pytest.mark.parametrize("tokens", [1, 32, 2048])
def test_norms(tokens):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 1024, generator=g).to(DEV, BF16)
    r = torch.randn(tokens, 1024, generator=g).to(DEV, BF16)
    w = (0.5 + torch.rand(1024, generator=g)).to(DEV, BF16)
    _one_unit_rarely(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), 1.5)
    out, res = add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(res, ref_res)
    _one_unit_rarely(out, ref_out, 1.5)


@pytest.mark.parametrize("tokens", [1, 32, 2048])
def test_silu_and_mul(tokens):
    x = (torch.randn(tokens, 2 * 3072, generator=torch.Generator().manual_seed(tokens)) * 2).to(DEV, BF16)
    _one_unit_rarely(silu_and_mul(x), silu_and_mul_ref(x))


@pytest.mark.parametrize("tokens", [1, 32, 2048])
def test_qk_norm_rope_write_kv_with_real_k_norm(tokens):
    g = torch.Generator().manual_seed(tokens)
    hq, hkv, d, ps = 16, 8, 128, 16
    pages = -(-tokens // ps) + 3
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).to(DEV, BF16)
    qw = (0.5 + torch.rand(d, generator=g)).to(DEV, BF16)
    kw = (torch.rand(d, generator=g) * 96.5).to(DEV, BF16)
    rope = RotaryEmbedding(d, 1e6, 40960, interleaved=False).to(DEV)
    positions = torch.randint(0, 40960, (tokens,), generator=g).to(DEV)
    slots = torch.randperm(pages * ps, generator=g)[:tokens].to(DEV)
    caches = [torch.zeros(pages, 2, hkv, ps, d, dtype=BF16, device=DEV) for _ in range(2)]
    q = qk_norm_rope_write_kv(qkv, positions, qw, kw, 1e-6, rope.cos, rope.sin, caches[0], slots, hq, hkv)
    q_ref = qk_norm_rope_write_kv_ref(qkv, positions, qw, kw, 1e-6, rope.cos, rope.sin, caches[1],
                                      slots, hq, hkv)
    _one_unit_rarely(q, q_ref, 1.5)
    assert torch.equal(caches[0][:, 1], caches[1][:, 1])
    _one_unit_rarely(caches[0][:, 0], caches[1][:, 0], 96.5)



@pytest.mark.parametrize("rows", [1, 2])
def test_gate_up_with_silu_mul_out_changes_no_bit(rows):
    """kernels.ROW_SILU_OUT at Qwen3-0.6B's MLP (gate_up 6,144 × 1,024, down 1,024 × 3,072), bf16,
    compiled for this card: SiLU·mul written by the gate_up matmul equals, bit for bit, the
    matmul's output through the standalone kernel, and down_proj over it what the SiLU prologue
    gave — so a decode step's output does not change."""
    from braid_engine.kernels.gemv import norm_matmul, row_matmul, silu_matmul

    g = torch.Generator().manual_seed(rows)
    x, r = ((torch.randn(rows, 1024, generator=g) * 3).to(DEV, BF16) for _ in range(2))
    nw = (0.5 + torch.rand(1024, generator=g)).to(DEV, BF16)
    gate_up = (torch.randn(6144, 1024, generator=g) * 0.03).to(DEV, BF16)
    down = (torch.randn(1024, 3072, generator=g) * 0.02).to(DEV, BF16)
    y, h = norm_matmul(x, r, nw, 1e-6, gate_up)
    act, h2 = norm_matmul(x, r, nw, 1e-6, gate_up, silu_out=True)
    assert torch.equal(h2, h)
    assert torch.equal(act, silu_and_mul(y))
    assert torch.equal(row_matmul(act, down), silu_matmul(y, down))
