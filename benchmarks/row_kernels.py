"""The matmuls of a batch-1 decode step, 28 Qwen3-0.6B layers under one CUDA graph: cuBLAS
with the standalone norm and SiLU·mul kernels, against the one-row matmul kernels with those
folded in (``braid_engine/kernels/gemv.py``), at a few block sizes, with and without
programmatic dependent launch (GPU only). ``--rows 2 4 8``: small decode batches instead, the
row kernels at their default sizes against cuBLAS at each. ``--hops``: what the chain of four
kernels a layer costs over one kernel reading the same bytes, with the weights in memory and in L2.

    python -m benchmarks.row_kernels [--rows 1 2 4 8] [--hops]

Attention sits between the two halves of a layer in the engine and is the same on both sides,
so it is left out. Weights are distinct per layer (0.88 GB in all), so every replay reads them
from memory as a decode step does, not from L2.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import graph_time
from braid_engine import kernels
from braid_engine.kernels import gemv
from braid_engine.kernels.activation import silu_and_mul
from braid_engine.kernels.rmsnorm import add_rms_norm

HIDDEN, INTER, QKV, Q = 1024, 3072, 4096, 2048


def layers(n: int):
    dev, bf = "cuda", torch.bfloat16

    def w(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device=dev, dtype=bf) * 0.02

    return [dict(n1=torch.rand(HIDDEN, device=dev, dtype=bf) + 0.5, n2=torch.rand(HIDDEN, device=dev, dtype=bf) + 0.5,
                 qkv=w(QKV, HIDDEN), o=w(HIDDEN, Q), gu=w(2 * INTER, HIDDEN), down=w(HIDDEN, INTER))
            for _ in range(n)]


def cublas_step(ws, x, r, o_in):
    for lw in ws:
        h, r = add_rms_norm(x, r, lw["n1"], 1e-6)
        F.linear(h, lw["qkv"])  # attention would read it and write o_in
        h, r = add_rms_norm(F.linear(o_in, lw["o"]), r, lw["n2"], 1e-6)
        x = F.linear(silu_and_mul(F.linear(h, lw["gu"])), lw["down"])
    return x


def row_step(ws, x, r, o_in, configs, silu_out: bool = False):
    c_qkv, c_o, c_gu, c_down = configs
    for lw in ws:
        _, r = gemv.norm_matmul(x, r, lw["n1"], 1e-6, lw["qkv"], config=c_qkv)
        h = gemv.row_matmul(o_in, lw["o"], config=c_o)
        gu, r = gemv.norm_matmul(h, r, lw["n2"], 1e-6, lw["gu"], config=c_gu, silu_out=silu_out)
        x = gemv.row_matmul(gu, lw["down"], config=c_down) if silu_out else gemv.silu_matmul(gu, lw["down"],
                                                                                             config=c_down)
    return x


def hops(ws, reps: int) -> None:
    """µs a layer: the four row kernels, against row kernels over a weight of the layer's bytes
    ([N, 1024], no norm) cut in 1, 2, 4, 8 equal parts (a kernel a part, chained as the engine's
    are), each on distinct weights a layer (read from memory) and on the first layer's for every
    layer (31 MB: in L2 after the first replay)."""
    n = len(ws)
    x, r = (torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o_in = torch.randn(1, Q, device="cuda", dtype=torch.bfloat16)
    layer_bytes = sum(t.nbytes for t in ws[0].values())
    flat = [torch.randn(layer_bytes // (2 * HIDDEN), HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in ws]

    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; {n} layers of "
          f"{layer_bytes / 1e6:.1f} MB; µs a layer in one CUDA graph")
    print(f"{'kernels a layer':>44} {'in memory':>10} {'TB/s':>6} {'in L2':>8} {'TB/s':>6}")

    def split(k: int, pdl: bool = True):
        def run(weights):
            kernels.PDL = pdl
            try:
                for w in weights:
                    for part in w.chunk(k):
                        gemv.row_matmul(x, part)
            finally:
                kernels.PDL = True
        return run

    ways = [("4 row kernels (the engine's)", lambda w: row_step(w, x, r, o_in, [None] * 4), ws, [ws[0]] * n)]
    ways += [(f"{k} row kernel{'s' * (k > 1)}, same bytes in {k} equal parts", split(k), flat, [flat[0]] * n)
             for k in (1, 2, 4, 8)]
    ways.append(("4 row kernels, same bytes in 4 parts, no PDL", split(4, pdl=False), flat, [flat[0]] * n))
    for name, fn, distinct, same in ways:
        mem = graph_time(lambda fn=fn, w=distinct: fn(w), reps) / n
        l2 = graph_time(lambda fn=fn, w=same: fn(w), reps) / n
        print(f"{name:>44} {mem * 1e6:>10.2f} {layer_bytes / mem / 1e12:>6.2f} {l2 * 1e6:>8.2f} "
              f"{layer_bytes / l2 / 1e12:>6.2f}", flush=True)


def per_kernel(ws, reps: int) -> None:
    """µs for each projection's kernel alone, 28 in a chain (one a layer, distinct weights): the
    engine's form (its prologue: norm, SiLU·mul, none), the same weight without the prologue, and
    the same bytes as a [N·K/1024, 1024] weight (one tile of K a program, as qkv and gate_up)."""
    n = len(ws)
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; each projection's kernel, {n} in one "
          f"CUDA graph; µs a kernel (TB/s)")
    print(f"{'projection':>14} {'MB':>5} {'engine form':>16} {'no prologue':>16} {'as K = 1024':>16}")
    for key, k_in, form in (("qkv", HIDDEN, "norm"), ("o", Q, "plain"), ("gu", HIDDEN, "norm"), ("down", INTER, "silu")):
        x = torch.randn(1, 2 * k_in if form == "silu" else k_in, device="cuda", dtype=torch.bfloat16)
        plain_x = torch.randn(1, k_in, device="cuda", dtype=torch.bfloat16)
        flat_x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
        flats = [lw[key].view(-1, HIDDEN) for lw in ws]

        def engine(key=key, form=form, x=x, r=r):
            for lw in ws:
                if form == "norm":
                    gemv.norm_matmul(x, r, lw["n1"], 1e-6, lw[key])
                elif form == "silu":
                    gemv.silu_matmul(x, lw[key])
                else:
                    gemv.row_matmul(x, lw[key])

        times = [graph_time(engine, reps),
                 graph_time(lambda key=key, x=plain_x: [gemv.row_matmul(x, lw[key]) for lw in ws], reps),
                 graph_time(lambda f=flats, x=flat_x: [gemv.row_matmul(x, w) for w in f], reps)]
        nbytes = ws[0][key].nbytes
        print(f"{key:>14} {nbytes / 1e6:>5.1f} " + " ".join(f"{t / n * 1e6:>8.2f} ({nbytes * n / t / 1e12:.2f})"
                                                           for t in times), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rows", type=int, nargs="*", default=None,
                    help="rows a step (a decode batch): the default kernels against cuBLAS at each")
    ap.add_argument("--hops", action="store_true",
                    help="the four kernels a layer against one over the same bytes, from memory and from L2")
    args = ap.parse_args()
    ws = layers(args.layers)
    if args.hops:
        hops(ws, args.reps)
        per_kernel(ws, args.reps)
        return
    if args.rows:
        by_rows(ws, args.rows, args.reps)
        return
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    o_in = torch.randn(1, Q, device="cuda", dtype=torch.bfloat16)  # attention's output
    weight_bytes = sum(t.nbytes for lw in ws for t in lw.values())
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.layers} layers, "
          f"{weight_bytes / 1e9:.2f} GB of weights")
    base = graph_time(lambda: cublas_step(ws, x, r, o_in), args.reps)
    print(f"{'kernels':52s} {'µs/layer':>9s} {'TB/s':>6s} {'vs cuBLAS':>9s}")
    print(f"{'cuBLAS + norm/SiLU kernels (8 a layer)':52s} {base / args.layers * 1e6:9.2f} "
          f"{weight_bytes / base / 1e12:6.2f} {1:8.2f}x")
    shapes = [(QKV, HIDDEN, gemv.NORM), (HIDDEN, Q, gemv.PLAIN), (2 * INTER, HIDDEN, gemv.NORM),
              (HIDDEN, INTER, gemv.SILU)]
    default = [gemv.default_config(n, k, p) for n, k, p in shapes]
    variants = {"default": (default, True)}
    variants["default, no PDL"] = (default, False)

    def scaled(c: dict, bn_scale: float, warps: int) -> dict:
        return {**c, "BLOCK_N": max(1, int(c["BLOCK_N"] * bn_scale)), "num_warps": warps}

    for bn_scale, warps in ((0.5, 4), (2, 8), (1, 8)):
        variants[f"BLOCK_N ×{bn_scale}, {warps} warps"] = ([scaled(c, bn_scale, warps) for c in default], True)
    # one kernel of the four changed at a time: whether a kernel's programs fitting beside the
    # one before (fewer registers, fewer programs) lets more of them read ahead of the wait
    for i, kernel in enumerate(("qkv", "o_proj", "gate_up", "down")):
        for bn_scale, warps in ((2, 4), (2, 8), (0.5, 4), (1, 2), (1, 8)):
            configs = [scaled(c, bn_scale, warps) if j == i else c for j, c in enumerate(default)]
            variants[f"{kernel} only: BLOCK_N ×{bn_scale}, {warps} warps"] = (configs, True)
    variants["default, SiLU·mul in gate_up's epilogue"] = (default, True)
    for name, (configs, pdl) in variants.items():
        kernels.PDL = pdl
        t = graph_time(lambda configs=configs, s="epilogue" in name: row_step(ws, x, r, o_in, configs, s), args.reps)
        print(f"{'row kernels (4 a layer), ' + name:52s} {t / args.layers * 1e6:9.2f} "
              f"{weight_bytes / t / 1e12:6.2f} {base / t:8.2f}x")
    kernels.PDL = True
    print("configs: " + "; ".join(f"{n}x{k}: {c}" for (n, k, _), c in zip(shapes, default, strict=True)))


def by_rows(ws, rows: list[int], reps: int) -> None:
    weight_bytes = sum(t.nbytes for lw in ws for t in lw.values())
    n = len(ws)
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; {n} layers, "
          f"{weight_bytes / 1e9:.2f} GB of weights; µs a layer, both in one CUDA graph each")
    print(f"{'rows':>4} {'cuBLAS + norm/SiLU':>19} {'row kernels':>12} {'TB/s':>6} {'ratio':>7}")
    for m in rows:
        x = torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16)
        o_in = torch.randn(m, Q, device="cuda", dtype=torch.bfloat16)
        base = graph_time(lambda x=x, r=r, o_in=o_in: cublas_step(ws, x, r, o_in), reps)
        t = graph_time(lambda x=x, r=r, o_in=o_in: row_step(ws, x, r, o_in, [None] * 4), reps)
        print(f"{m:>4} {base / n * 1e6:>19.2f} {t / n * 1e6:>12.2f} {weight_bytes / t / 1e12:>6.2f} {base / t:>6.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
