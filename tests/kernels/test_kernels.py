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
# few tokens: 8 heads a program (6 + 3 heads: two programs, the second half empty); 70 tokens:
# one program a token, every head in one tile
@pytest.mark.parametrize("hq,hkv,t", [(4, 2, 7), (6, 3, 7), (6, 3, 70)])
def test_qk_norm_rope_write_kv(device, dtype, norm, hq, hkv, t):
    g = torch.Generator().manual_seed(3)
    d, ps = 32, 4
    pages = -(-t // ps) + 2
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(device, dtype)
    qw = (0.5 + torch.rand(d, generator=g)).to(device, dtype) if norm else None
    # k_norm weights as large as Qwen3-0.6B's (96.5) make any rounding slip visible
    kw = (torch.rand(d, generator=g) * 96.5).to(device, dtype) if norm else None
    rope = RotaryEmbedding(d, 1e6, 64, interleaved=False).to(device)
    positions = torch.randint(0, 64, (t,), generator=g).to(device)
    slots = torch.randperm(pages * ps, generator=g)[:t].to(device)
    caches = [torch.zeros(pages, 2, hkv, ps, d, dtype=dtype, device=device) for _ in range(2)]
    q = qk_norm_rope_write_kv(qkv, positions, qw, kw, 1e-6, rope.cos, rope.sin, caches[0], slots, hq, hkv)
    q_ref = qk_norm_rope_write_kv_ref(qkv, positions, qw, kw, 1e-6, rope.cos, rope.sin, caches[1],
                                      slots, hq, hkv)
    _close(q, q_ref)
    _close(caches[0], caches[1])
    assert caches[0][:, 1].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [7, 70])
def test_qk_norm_rope_can_hand_back_the_rotated_k_in_place(device, dtype, t):
    """A fresh prompt's attention reads k from the step's own qkv rows: with k_in_place the
    kernel overwrites qkv's k columns with exactly the k it stores in the cache, and leaves the
    q and v columns as they were."""
    g = torch.Generator().manual_seed(5)
    hq, hkv, d, ps = 6, 3, 32, 4
    pages = -(-t // ps)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(device, dtype)
    before = qkv.clone()
    qw = (0.5 + torch.rand(d, generator=g)).to(device, dtype)
    kw = (torch.rand(d, generator=g) * 96.5).to(device, dtype)
    rope = RotaryEmbedding(d, 1e6, 128, interleaved=False).to(device)
    positions = torch.arange(t, device=device)
    slots = torch.randperm(pages * ps, generator=g)[:t].to(device)
    caches = [torch.zeros(pages, 2, hkv, ps, d, dtype=dtype, device=device) for _ in range(2)]
    q = qk_norm_rope_write_kv(qkv, positions, qw, kw, 1e-6, rope.cos, rope.sin, caches[0], slots, hq, hkv,
                              k_in_place=True)
    q_plain = qk_norm_rope_write_kv(before.clone(), positions, qw, kw, 1e-6, rope.cos, rope.sin, caches[1],
                                    slots, hq, hkv)
    assert torch.equal(q, q_plain) and torch.equal(caches[0], caches[1])
    qs, ks = hq * d, hkv * d
    k_cached = caches[0][slots // ps, 0, :, slots % ps]  # [t, hkv, d]
    assert torch.equal(qkv[:, qs:qs + ks].reshape(t, hkv, d), k_cached)
    assert not torch.equal(qkv[:, qs:qs + ks], before[:, qs:qs + ks])
    assert torch.equal(qkv[:, :qs], before[:, :qs]) and torch.equal(qkv[:, qs + ks:], before[:, qs + ks:])
    with pytest.raises(ValueError, match="unit stride"):
        qk_norm_rope_write_kv(before.T.contiguous().T, positions, qw, kw, 1e-6, rope.cos, rope.sin, caches[0],
                              slots, hq, hkv, k_in_place=True)


def _matmul_close(y: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """y is a @ wᵀ (+ b) summed in float32 and rounded once: within a few float32 units of the
    scale of the terms, plus one rounding of the output dtype; and in a 16-bit dtype, equal to
    the exact product rounded once (a float32 sum lands on the other side of a rounding
    boundary rarely: one output a row, or 1 %, may), which a slip in the prologue's roundings
    would break for ~half the outputs."""
    exact = a.double() @ w.double().T + (b.double() if b is not None else 0)
    scale = (a.double().abs() @ w.double().abs().T).max().item()
    tol = scale * 4e-6 + torch.finfo(y.dtype).eps * exact.abs().max().item()
    assert y.shape == exact.shape and y.dtype == a.dtype
    assert (y.double() - exact).abs().max().item() <= tol
    if y.dtype != torch.float32:
        assert (y != exact.to(y.dtype)).sum().item() <= max(y.shape[0], y.numel() // 100)


# uneven N and K exercise the masks; small tiles make the plain and SiLU kernels loop over K
CONFIGS = [None, {"BLOCK_N": 4, "BLOCK_K": 64, "num_warps": 2}]


# one row (batch-1 decode), and small batches: 3 rows pad to a 4-row program, 8 fill one
ROWS = [1, 2, 3, 8]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,k,bias", [(40, 96, False), (33, 200, True)])
def test_row_matmul(device, dtype, rows, n, k, bias):
    from braid_engine.kernels.gemv import row_matmul

    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(rows, k, generator=g).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    for config in CONFIGS:
        _matmul_close(row_matmul(x, w, b, config=config), x, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,k,bias", [(40, 96, False), (33, 200, True), (512, 96, False)])
def test_silu_matmul(device, dtype, rows, n, k, bias):
    """The SiLU·mul inside the matmul rounds as the standalone kernel's reference does."""
    from braid_engine.kernels.gemv import silu_matmul

    g = torch.Generator().manual_seed(n * k)
    x = (torch.randn(rows, 2 * k, generator=g) * 3).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    for config in CONFIGS:
        _matmul_close(silu_matmul(x, w, b, config=config), silu_and_mul_ref(x), w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("n,k,bias", [(40, 96, False), (33, 64, True), (512, 96, False)])
def test_norm_matmul(device, dtype, rows, residual, n, k, bias):
    """Residual add and RMSNorm inside the matmul, each row normalised on its own: the new
    residual is the exact rounded sum, the product is the reference norm's output times the
    weight."""
    from braid_engine.kernels.gemv import norm_matmul

    g = torch.Generator().manual_seed(n + 7 * k)
    # rows of different scales: a norm taken over the wrong row, or over all, moves whole units
    x = (torch.randn(rows, k, generator=g) * torch.arange(1, rows + 1)[:, None]).to(device, dtype)
    r = torch.randn(rows, k, generator=g).to(device, dtype) if residual else None
    nw = (torch.rand(k, generator=g) * 4).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    y, h = norm_matmul(x, r, nw, 1e-6, w, b)
    if residual:
        normed, ref_h = add_rms_norm_ref(x, r, nw, 1e-6)
        assert torch.equal(h, ref_h)
    else:
        normed = rms_norm_ref(x, nw, 1e-6)
        assert h is x
    _matmul_close(y, normed, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n,k,bias,config", [(80, 96, False, None), (66, 64, True, None),
                                             (1024, 96, False, None), (66, 64, False, {"BLOCK_N": 1, "BLOCK_K": 64,
                                                                                        "num_warps": 2})])
def test_norm_matmul_can_give_silu_mul_of_its_gate_and_up_halves(device, dtype, rows, n, k, bias, config):
    """With silu_out the gate_up matmul writes SiLU(gate)·up itself: bit for bit what the matmul
    followed by the standalone kernel gives, and the down matmul over it (a plain row matmul) bit
    for bit what the SiLU prologue gave — the layer's output does not change."""
    from braid_engine.kernels.gemv import norm_matmul, row_matmul, silu_matmul

    g = torch.Generator().manual_seed(n + k + rows)
    x = (torch.randn(rows, k, generator=g) * torch.arange(1, rows + 1)[:, None]).to(device, dtype)
    r = torch.randn(rows, k, generator=g).to(device, dtype)
    nw = (torch.rand(k, generator=g) * 4).to(device, dtype)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    down = torch.randn(k, n // 2, generator=g).to(device, dtype)
    gate_up, h = norm_matmul(x, r, nw, 1e-6, w, b, config=config)
    act, h2 = norm_matmul(x, r, nw, 1e-6, w, b, config=config, silu_out=True)
    assert act.shape == (rows, n // 2)
    assert torch.equal(act, silu_and_mul(gate_up))
    assert torch.equal(h2, h)
    assert torch.equal(row_matmul(act, down), silu_matmul(gate_up, down))


def test_silu_out_needs_an_even_weight(device):
    from braid_engine.kernels.gemv import norm_matmul

    x = torch.randn(1, 64, device=device)
    with pytest.raises(ValueError, match="gate and up rows of equal count"):
        norm_matmul(x, None, torch.ones(64, device=device), 1e-6, torch.randn(33, 64, device=device), silu_out=True)


@pytest.mark.parametrize("rows", [3, 5])
@pytest.mark.parametrize("prologue,silu_out", [(0, False), (1, False), (2, False), (1, True)])
def test_row_kernels_leave_the_padding_rows_alone(device, rows, prologue, silu_out):
    """Rows padded to a power of two: every buffer holds NaN rows after the real ones; the kernel
    neither writes them (outputs, residual sums) nor lets them into the real rows, which equal
    what a launch over the real rows alone gives (also where it writes SiLU·mul of its halves)."""
    import triton

    from braid_engine.kernels import gemv

    n, k = 40, 96
    width = 2 * k if prologue == gemv.SILU else k
    pad = triton.next_power_of_2(rows)
    g = torch.Generator().manual_seed(rows + 10 * prologue)

    def padded(cols: int) -> torch.Tensor:
        t = torch.full((pad, cols), float("nan"))
        t[:rows] = torch.randn(rows, cols, generator=g)
        return t.to(device)

    x, r = padded(width), padded(k)
    nw = (torch.rand(k, generator=g) + 0.5).to(device)
    w = torch.randn(n, k, generator=g).to(device)
    b = torch.randn(n, generator=g).to(device)
    out = n // 2 if silu_out else n
    y, h = torch.full((pad, out), float("nan"), device=device), torch.full((pad, k), float("nan"), device=device)
    cfg = dict(gemv.default_config(n, k, prologue))
    warps = cfg.pop("num_warps")
    norm = prologue == gemv.NORM
    gemv._row_matmul_kernel[(triton.cdiv(out, cfg["BLOCK_N"] // (2 if silu_out else 1)),)](
        x, x, r, nw, w, b, y, h, rows, n, k, 1e-6, PROLOGUE=prologue, HAS_RESIDUAL=norm, HAS_BIAS=True,
        USE_PDL=False, ROWS=pad, SILU_OUT=silu_out, GATHER=False, num_warps=warps, **cfg)
    assert y[rows:].isnan().all() and h[rows:].isnan().all()
    want, want_h = gemv._launch(prologue, x[:rows], w, b, r[:rows] if norm else None, nw if norm else None, 1e-6,
                                silu_out=silu_out)
    assert torch.equal(y[:rows], want)
    if norm:
        assert torch.equal(h[:rows], want_h)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_norm_matmul_gathers_embedding_rows_as_given_them(device, dtype, rows):
    """The first layer's qkv kernel reading its rows from the embedding table by token id
    (kernels.FOLD_EMBEDDING): the same product bit for bit as the gathered rows given, and the
    residual stream it hands on is those rows (ids repeat and lie far apart in the table)."""
    from braid_engine.kernels.gemv import norm_matmul

    g = torch.Generator().manual_seed(rows)
    table = (torch.randn(500, 96, generator=g) * torch.rand(500, 1, generator=g) * 8).to(device, dtype)
    ids = torch.tensor([499, 3, 499][:rows], device=device)
    nw = (torch.rand(96, generator=g) * 4).to(device, dtype)
    w = torch.randn(72, 96, generator=g).to(device, dtype)
    y, h = norm_matmul(table, None, nw, 1e-6, w, ids=ids)
    want, _ = norm_matmul(table[ids], None, nw, 1e-6, w)
    assert torch.equal(y, want)
    assert torch.equal(h, table[ids]) and h.data_ptr() != table.data_ptr()


def test_gathered_rows_need_a_norm_without_a_residual_and_int64_ids(device):
    from braid_engine.kernels.gemv import norm_matmul

    table, w, nw = torch.zeros(10, 8, device=device), torch.zeros(4, 8, device=device), torch.ones(8, device=device)
    ids = torch.tensor([1, 2], device=device)
    with pytest.raises(ValueError, match="without a residual, by int64 ids"):
        norm_matmul(table, torch.zeros(2, 8, device=device), nw, 1e-6, w, ids=ids)
    with pytest.raises(ValueError, match="without a residual, by int64 ids"):
        norm_matmul(table, None, nw, 1e-6, w, ids=ids.int())
    with pytest.raises(ValueError, match=r"embedding table must be \[vocab, 8\]"):
        norm_matmul(torch.zeros(10, 9, device=device), None, nw, 1e-6, w, ids=ids)


def test_one_row_matmuls_refuse_other_shapes(device):
    from braid_engine.kernels.gemv import MAX_ROWS, norm_matmul, row_matmul, silu_matmul

    w = torch.zeros(4, 8, device=device)
    for rows in (0, MAX_ROWS + 1):
        with pytest.raises(ValueError, match=rf"\[rows, 8\] input of 1 to {MAX_ROWS} rows"):
            row_matmul(torch.zeros(rows, 8, device=device), w)
    with pytest.raises(ValueError, match=r"\[rows, 8\]"):
        row_matmul(torch.zeros(8, device=device), w)
    with pytest.raises(ValueError, match=r"\[rows, 16\]"):
        silu_matmul(torch.zeros(1, 8, device=device), w)
    with pytest.raises(ValueError, match=r"\[rows, 8\]"):
        norm_matmul(torch.zeros(1, 9, device=device), None, torch.ones(9, device=device), 1e-6, w)
    with pytest.raises(ValueError, match="residual must match"):
        norm_matmul(torch.zeros(2, 8, device=device), torch.zeros(1, 8, device=device), torch.ones(8, device=device),
                    1e-6, w)


def _decode_attention_case(device, dtype, hq, hkv, ps, lens, **kwargs):
    """Each sequence of ``lens`` keys (pages shuffled) against the reference attention over its
    own keys; the kernel's object, to look at its settings."""
    from braid_engine.attention.torch_backend import attend
    from braid_engine.kernels.decode_attention import DecodeAttention

    g = torch.Generator().manual_seed(hq * 10 + hkv + ps)
    d = 32
    pages_each = [-(-n // ps) for n in lens]
    order = torch.randperm(sum(pages_each) + 3, generator=g)
    table = torch.zeros(len(lens), max(pages_each), dtype=torch.int32)
    at = 0
    for i, n in enumerate(pages_each):
        table[i, :n] = order[at:at + n]
        at += n
    cache = torch.randn(sum(pages_each) + 3, 2, hkv, ps, d, generator=g).to(device, dtype)
    q = torch.randn(len(lens), hq, d, generator=g).to(device, dtype)
    op = DecodeAttention(len(lens), hq, hkv, d, torch.device(device), **kwargs)
    out = op(q, cache, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device), d ** -0.5)
    for i, n in enumerate(lens):
        pos = torch.arange(n)
        slots = table[i, pos // ps].long().to(device), (pos % ps).to(device)
        k = cache[slots[0], 0, :, slots[1]]  # [n, Hkv, D]
        v = cache[slots[0], 1, :, slots[1]]
        ref, _ = attend(q[i:i + 1], k, v, d ** -0.5)
        tol = 1e-5 if dtype == torch.float32 else 4e-3
        torch.testing.assert_close(out[i:i + 1].float(), ref, rtol=tol, atol=tol)
    return op


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 2)])
def test_decode_attention_matches_the_torch_reference(device, dtype, hq, hkv):
    """Lengths of 1, a page ± 1, one tile ± 1, a few tiles and many (every split active), pages
    of 4 keys shuffled, 4 splits of 16-key tiles at most."""
    _decode_attention_case(device, dtype, hq, hkv, 4, [1, 3, 4, 5, 15, 16, 17, 70, 200], splits=4, block_t=16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_with_its_defaults_and_pages_larger_than_a_tile(device, dtype):
    """The engine's settings (64 splits at most, 32-key tiles) on 64-key pages: a tile ± 1, a
    page ± 1, and 2,049 keys (65 tiles over 64 splits: the last split's stretch is short)."""
    _decode_attention_case(device, dtype, 4, 2, 64, [1, 31, 32, 33, 63, 64, 65, 2049])


def test_decode_attention_takes_the_settings_left_out_from_the_module_switch(device, monkeypatch):
    """Made with no settings, the kernel reads kernels.SPLIT_KV_CONFIG as it is then (decode.py
    --compare-split-config captures a second engine so): 4 splits of 16-key tiles, 200 keys
    filling every split, the reference's results; a setting given wins over the switch."""
    from braid_engine import kernels
    from braid_engine.kernels.decode_attention import DecodeAttention

    monkeypatch.setattr(kernels, "SPLIT_KV_CONFIG", (4, 16, 4, 1))
    op = _decode_attention_case(device, torch.float32, 4, 2, 4, [1, 17, 70, 200])
    assert (op.splits, op.block_t, op.num_warps, op.num_stages) == (4, 16, 4, 1)
    op = DecodeAttention(1, 4, 2, 32, torch.device(device), splits=8)
    assert (op.splits, op.block_t, op.num_warps, op.num_stages) == (8, 16, 4, 1)


def test_decode_attention_refuses_shapes_it_cannot_tile(device):
    from braid_engine.kernels.decode_attention import DecodeAttention

    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        DecodeAttention(1, 4, 2, 96, torch.device(device))
    with pytest.raises(ValueError, match="block_t must be a power of two"):
        DecodeAttention(1, 4, 2, 64, torch.device(device), block_t=8)
    with pytest.raises(ValueError, match="do not group"):
        DecodeAttention(1, 6, 4, 64, torch.device(device))


def test_silu_out_is_used_only_where_a_program_holds_a_gate_and_an_up_row():
    """Found by review: at hidden sizes past 4,096 the norm's whole-row tile holds one weight row,
    and silu_out doubled it (255 registers and a stack on sm_90 at 8,192): those models keep the
    SiLU prologue in down_proj."""
    from braid_engine.kernels.gemv import silu_out_fits

    def gate_up(hidden: int, inter: int) -> torch.Tensor:
        return torch.empty(2 * inter, hidden, device="meta")

    assert silu_out_fits(gate_up(1024, 3072))  # Qwen3-0.6B
    assert silu_out_fits(gate_up(2048, 5632))  # TinyLlama
    assert silu_out_fits(gate_up(4096, 12288))  # Qwen3-8B
    assert not silu_out_fits(gate_up(5120, 17408))  # Qwen3-14B
    assert not silu_out_fits(gate_up(8192, 28672))  # Llama-3-70B
