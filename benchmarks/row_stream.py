"""The streaming one-row matmuls (``braid_engine/kernels/row_stream.py``, CUDA C++) against the
Triton row kernels (``gemv.py``): batch-1 decode shapes of Qwen3-0.6B, 28 layers' matmuls in one
CUDA graph, a few block and piece sizes, with and without programmatic dependent launch (GPU).

    python -m benchmarks.row_stream

Each variant is first checked against torch's unfused ops in float32 on every prologue. A first
form of streaming in Triton (programs walking several tiles, TMA or pipelined loads) reached
0.64-0.96 TB/s against the row kernels' 1.97 (commit c3ed19d,
``docs/data/row-stream-triton-h100-2026-11-27-s12.txt``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import graph_time
from benchmarks.row_kernels import HIDDEN, INTER, QKV, Q, layers, row_step
from braid_engine.kernels import gemv, row_stream


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


def check(block_bytes: int, piece_bytes: int, pdl: bool, threads: int) -> float:
    """Worst relative error over the four projections' prologues, at Qwen3 shapes and a ragged one."""
    torch.manual_seed(0)
    worst = 0.0
    for prologue, residual, n, k in ((gemv.NORM, True, QKV, HIDDEN), (gemv.NORM, False, 2 * INTER, HIDDEN),
                                     (gemv.PLAIN, False, HIDDEN, Q), (gemv.SILU, False, HIDDEN, INTER),
                                     (gemv.PLAIN, False, 1000, 512)):
        x = torch.randn(1, 2 * k if prologue == gemv.SILU else k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05
        r = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) if residual else None
        nw = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        y, h = row_stream.launch(prologue, x, w, None, r, nw, 1e-6, pdl, block_bytes, piece_bytes, threads)
        ref = reference(prologue, x, w, r, nw, 1e-6)
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-2, (prologue, n, k, err)
        tri = gemv._launch(prologue, x, w, None, r, nw if prologue == gemv.NORM else None, 1e-6,
                           gemv.default_config(n, k, prologue))[0]  # a config: the Triton kernel
        assert ((y.float() - tri.float()).abs().max() / tri.float().abs().max()).item() < 1e-2
        if residual:
            assert torch.equal(h, (x.float() + r.float()).to(x.dtype))
        worst = max(worst, err)
    return worst


def stream_step(ws, x, r, o_in, block_bytes, piece_bytes, pdl, threads, only_load=False):
    def mm(prologue, x, w, r=None, nw=None):
        return row_stream.launch(prologue, x, w, None, r, nw, 1e-6, pdl, block_bytes, piece_bytes, threads, only_load)

    for lw in ws:
        _, r = mm(gemv.NORM, x, lw["qkv"], r, lw["n1"])
        h, _ = mm(gemv.PLAIN, o_in, lw["o"])
        gu, r = mm(gemv.NORM, h, lw["gu"], r, lw["n2"])
        x, _ = mm(gemv.SILU, gu, lw["down"])
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    if not row_stream.available(torch.device("cuda")):
        raise SystemExit("the streaming row kernels need a Hopper GPU where their source builds")
    ws = layers(args.layers)
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    o_in = torch.randn(1, Q, device="cuda", dtype=torch.bfloat16)
    weight_bytes = sum(t.nbytes for lw in ws for t in lw.values())
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.layers} layers, "
          f"{weight_bytes / 1e9:.2f} GB of weights")
    shapes = [(QKV, HIDDEN, gemv.NORM), (HIDDEN, Q, gemv.PLAIN), (2 * INTER, HIDDEN, gemv.NORM),
              (HIDDEN, INTER, gemv.SILU)]
    default = [gemv.default_config(n, k, p) for n, k, p in shapes]
    base = graph_time(lambda: row_step(ws, x, r, o_in, default), args.reps)
    print(f"{'kernels':52s} {'µs/layer':>9s} {'TB/s':>6s} {'vs rows':>8s}  max rel err")
    print(f"{'Triton row kernels (gemv.py, PDL)':52s} {base / args.layers * 1e6:9.2f} "
          f"{weight_bytes / base / 1e12:6.2f} {1:7.2f}x", flush=True)
    pb0 = row_stream.PIECE_BYTES
    # (block bytes, threads, PDL, copies alone)
    variants = [(48 * 1024, 1024, True, False), (100 * 1024, 1024, True, False), (32 * 1024, 1024, True, False),
                (48 * 1024, 512, True, False), (100 * 1024, 512, True, False), (32 * 1024, 512, True, False),
                (48 * 1024, 1024, False, False), (48 * 1024, 1024, True, True), (48 * 1024, 512, True, True)]
    for bb, th, pdl, only in variants:
        err = float("nan") if only else check(bb, pb0, pdl, th)
        t = graph_time(lambda bb=bb, th=th, pdl=pdl, only=only: stream_step(ws, x, r, o_in, bb, pb0, pdl, th, only),
                       args.reps)
        label = (f"streaming, {th}t, blocks ≤ {bb // 1024} KB, pieces {pb0 // 1024} KB"
                 f"{'' if pdl else ', no PDL'}{', copies alone' if only else ''}")
        print(f"{label:52s} {t / args.layers * 1e6:9.2f} {weight_bytes / t / 1e12:6.2f} {base / t:7.2f}x  {err:.2e}",
              flush=True)
    # each kernel's own time, eagerly, one after another (no graph, no PDL): the work after the
    # copies is the difference between a kernel and its copies alone
    bb0, th0 = row_stream.BLOCK_BYTES, row_stream.THREADS
    for name, step in (("Triton rows", lambda: row_step(ws, x, r, o_in, default)),
                       ("streaming", lambda: stream_step(ws, x, r, o_in, bb0, pb0, False, th0)),
                       ("copies alone", lambda: stream_step(ws, x, r, o_in, bb0, pb0, False, th0, True))):
        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        rows = sorted(((e.key, e.count, e.device_time) for e in prof.key_averages() if e.device_time > 0),
                      key=lambda e: e[0])
        print(f"{name}: " + "; ".join(f"{k[k.find('<'):][:32] if '<' in k else k[:32]} x{c} {t:.2f} µs"
                                      for k, c, t in rows[:6]))
    print("layouts (rows a block, rows a piece) at the defaults: " + "; ".join(
        f"{n}x{k}: {row_stream.layout(n, k, 2, torch.cuda.get_device_properties(0).multi_processor_count)}"
        for n, k, _ in shapes))


if __name__ == "__main__":
    main()
