"""Streaming one-row matmuls against the engine's row kernels (``gemv.py``), batch-1 decode
shapes of Qwen3-0.6B, 28 layers in one CUDA graph (GPU; ``--check`` also runs in the interpreter).

The row kernels give each program one tile of weights (16 KB) and end: between waves an SM has
nothing in flight, and they stream at ~2.0 TB/s. Here each program stays and walks several tiles,
its weight tiles coming in ahead of use — through the TMA into shared memory (``tma``) or plain
loads the compiler pipelines (``ptr``), ``stages`` deep — so an SM keeps a few tiles in flight
through the whole kernel. Under programmatic dependent launch a program asks L2 for its first
tile before it waits for the kernel before (``l2``), since its loads come after the wait.

    python -m benchmarks.row_stream            # time the variants (GPU)
    python -m benchmarks.row_stream --check    # compare every variant with torch, small shapes
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from braid_engine import kernels
from braid_engine.kernels import gemv, pdl_args

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

HIDDEN, INTER, QKV, Q = 1024, 3072, 4096, 2048


@triton.jit
def _activation(x_ptr, r_ptr, nw_ptr, rk, K, rstd, dtype: tl.constexpr, PROLOGUE: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr):
    """Columns ``rk`` of the matmul's input in float32, rounded as gemv's _prologue rounds."""
    if PROLOGUE == 1:
        x = tl.load(x_ptr + rk)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(r_ptr + rk).to(tl.float32)).to(dtype)
        h = (x.to(tl.float32) * rstd).to(dtype)
        a = (tl.load(nw_ptr + rk).to(tl.float32) * h.to(tl.float32)).to(dtype)
    elif PROLOGUE == 2:
        g = tl.load(x_ptr + rk).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(dtype)
        a = (s.to(tl.float32) * tl.load(x_ptr + K + rk).to(tl.float32)).to(dtype)
    else:
        a = tl.load(x_ptr + rk)
    return a.to(tl.float32)


@triton.jit
def _stream_kernel(x_ptr, r_ptr, nw_ptr, w_desc, w_ptr, y_ptr, h_ptr, N, K, eps,
                   PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr, L2: tl.constexpr,
                   FLATTEN: tl.constexpr, USE_PDL: tl.constexpr):
    dtype = y_ptr.dtype.element_ty
    pid = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if L2:
            # this program's first rows of weights, contiguous, into L2 while the kernel before ends
            tl.inline_asm_elementwise(
                "{ cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }", "=r,l,r",
                [w_ptr + pid * BLOCK_N * K, BLOCK_N * K * 2], dtype=tl.int32, is_pure=False, pack=1)
        tl.extra.cuda.gdc_wait()
    rstd = 0.0
    if PROLOGUE == 1:
        ss = 0.0
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rk)
            if HAS_RESIDUAL:
                x = (x.to(tl.float32) + tl.load(r_ptr + rk).to(tl.float32)).to(dtype)
                if pid == 0:
                    tl.store(h_ptr + rk, x)
            xf = x.to(tl.float32)
            ss += tl.sum(xf * xf, axis=0)
        rstd = tl.math.rsqrt(ss / K + eps)
    for tile in tl.range(pid, tl.cdiv(N, BLOCK_N), tl.num_programs(0), flatten=FLATTEN):
        rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            rk = k0 + tl.arange(0, BLOCK_K)
            if TMA:
                w = w_desc.load([tile * BLOCK_N, k0])
            else:
                w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])
            a = _activation(x_ptr, r_ptr, nw_ptr, rk, K, rstd, dtype, PROLOGUE, HAS_RESIDUAL)
            acc += w.to(tl.float32) * a[None, :]
        tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(dtype))


_SMS: dict[int, int] = {}


def _programs(device: torch.device, per_sm: int, tiles: int) -> int:
    if not per_sm:
        return tiles  # one program a tile
    if device.type != "cuda":
        return min(tiles, 2)  # the interpreter: two programs, several tiles each
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return min(tiles, per_sm * _SMS[index])


def stream(prologue: int, x, weight, cfg, residual=None, norm_weight=None, eps=0.0, desc=None):
    """One streaming matmul; ``cfg`` = (BLOCK_N, BLOCK_K, warps, stages, per_sm, tma, l2)."""
    bn, bk, warps, stages, per_sm, tma, l2 = cfg
    n, k = weight.shape
    if n % bn or k % bk:
        raise ValueError(f"[{n}, {k}] weight needs whole {bn}x{bk} tiles")
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    h = torch.empty_like(x) if residual is not None else None
    if tma and desc is None:
        desc = TensorDescriptor.from_tensor(weight, [bn, bk])
    pdl = pdl_args(x.device)
    _stream_kernel[(_programs(x.device, per_sm, n // bn),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        desc if tma else weight, weight, y, h if h is not None else y, n, k, eps,
        PROLOGUE=prologue, HAS_RESIDUAL=residual is not None, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages,
        TMA=tma, L2=l2 and pdl["USE_PDL"], FLATTEN=per_sm > 0, num_warps=warps, **pdl)
    return y, (h if h is not None else x)


def reference(prologue: int, x, weight, residual=None, norm_weight=None, eps=0.0):
    """torch's unfused ops in float32."""
    x = x.float()
    if prologue == gemv.NORM:
        if residual is not None:
            x = x + residual.float()
        x = norm_weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    elif prologue == gemv.SILU:
        g, u = x.chunk(2, dim=-1)
        x = F.silu(g) * u
    return F.linear(x, weight.float())


def check(device: str, dtype: torch.dtype) -> None:
    """Every kind of variant on small shapes against the float32 reference."""
    torch.manual_seed(0)
    worst = 0.0
    for prologue, residual, (n, k), (bn, bk, stages, per_sm, tma) in itertools.product(
            (gemv.PLAIN, gemv.NORM, gemv.SILU), (False, True), ((64, 128), (32, 256)),
            ((16, 64, 2, 1, False), (16, 64, 3, 2, True), (32, 128, 1, 0, True))):
        if residual and prologue != gemv.NORM or tma and TensorDescriptor is None:
            continue
        x = torch.randn(1, 2 * k if prologue == gemv.SILU else k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.05
        r = torch.randn(1, k, device=device, dtype=dtype) if residual else None
        nw = torch.rand(k, device=device, dtype=dtype) + 0.5
        y, h = stream(prologue, x, w, (bn, bk, 4, stages, per_sm, tma, True), r, nw, 1e-6)
        ref = reference(prologue, x, w, r, nw, 1e-6)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, err)
        assert err < 2e-2, (prologue, residual, n, k, bn, bk, stages, per_sm, tma, err)
        if residual:
            assert torch.equal(h, (x.float() + r.float()).to(dtype))
    print(f"check passed on {device} ({dtype}): worst relative error {worst:.2e}")


def layers(n: int):
    def w(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02

    return [dict(n1=torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5,
                 n2=torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5,
                 qkv=w(QKV, HIDDEN), o=w(HIDDEN, Q), gu=w(2 * INTER, HIDDEN), down=w(HIDDEN, INTER))
            for _ in range(n)]


def stream_step(ws, x, r, o_in, cfgs, descs):
    c_qkv, c_o, c_gu, c_down = cfgs
    for lw, d in zip(ws, descs, strict=True):
        _, r = stream(gemv.NORM, x, lw["qkv"], c_qkv, r, lw["n1"], 1e-6, d["qkv"])
        h, _ = stream(gemv.PLAIN, o_in, lw["o"], c_o, desc=d["o"])
        gu, r = stream(gemv.NORM, h, lw["gu"], c_gu, r, lw["n2"], 1e-6, d["gu"])
        x, _ = stream(gemv.SILU, gu, lw["down"], c_down, desc=d["down"])
    return x


def main() -> None:
    from benchmarks.common import graph_time
    from benchmarks.row_kernels import row_step

    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare with torch on small shapes and stop")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    if args.check or not torch.cuda.is_available():
        check("cuda" if torch.cuda.is_available() else "cpu",
              torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        if args.check:
            return
    check("cuda", torch.bfloat16)
    ws = layers(args.layers)
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    o_in = torch.randn(1, Q, device="cuda", dtype=torch.bfloat16)
    weight_bytes = sum(t.nbytes for lw in ws for t in lw.values())
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{args.layers} layers, {weight_bytes / 1e9:.2f} GB of weights")
    shapes = [(QKV, HIDDEN, gemv.NORM), (HIDDEN, Q, gemv.PLAIN), (2 * INTER, HIDDEN, gemv.NORM),
              (HIDDEN, INTER, gemv.SILU)]
    default = [gemv.default_config(n, k, p) for n, k, p in shapes]
    base = graph_time(lambda: row_step(ws, x, r, o_in, default), args.reps)
    print(f"{'kernels':58s} {'µs/layer':>9s} {'TB/s':>6s} {'vs rows':>8s}")
    print(f"{'row kernels (gemv.py, PDL)':58s} {base / args.layers * 1e6:9.2f} {weight_bytes / base / 1e12:6.2f} "
          f"{1:7.2f}x", flush=True)
    names = ("qkv", "o", "gu", "down")
    results = []
    variants = [(bn, bk, 4, stages, per_sm, tma, True)
                for (bn, bk), per_sm, tma in itertools.product(((16, 256), (32, 128), (32, 256), (64, 128)), (1, 2),
                                                              (True, False))
                for stages in ((2, 3, 4) if tma else (2, 3))]
    variants += [(32, 256, 4, 3, per_sm, tma, False) for per_sm in (1, 2) for tma in (True, False)]
    variants += [(32, 256, 8, 3, per_sm, True, True) for per_sm in (1, 2)]
    for bn, bk, warps, stages, per_sm, tma, l2 in variants:
        cfg = (bn, bk, warps, stages, per_sm, tma, l2)
        descs = [{name: (TensorDescriptor.from_tensor(lw[name], [bn, bk]) if tma else None) for name in names}
                 for lw in ws]
        try:
            t = graph_time(lambda cfg=cfg, descs=descs: stream_step(ws, x, r, o_in, [cfg] * 4, descs), args.reps)
        except Exception as e:  # a setting the compiler or the card refuses (shared memory): say so, go on
            print(f"{str(cfg):58s} failed: {type(e).__name__}: {str(e)[:80]}", flush=True)
            continue
        results.append((t, cfg))
        label = f"stream {bn}x{bk} w{warps} s{stages} {per_sm}/SM {'tma' if tma else 'ptr'}{' l2' if l2 else ''}"
        print(f"{label:58s} {t / args.layers * 1e6:9.2f} {weight_bytes / t / 1e12:6.2f} {base / t:7.2f}x",
              flush=True)
    results.sort()
    print("best 5:", "; ".join(f"{c} {t / args.layers * 1e6:.2f}" for t, c in results[:5]))
    kernels.PDL = True


if __name__ == "__main__":
    main()
