"""The matmuls of a batch-1 decode step, 28 Qwen3-0.6B layers under one CUDA graph: cuBLAS
with the standalone norm and SiLU·mul kernels, against the one-row matmul kernels with those
folded in (``braid_engine/kernels/gemv.py``), at a few block sizes, with and without
programmatic dependent launch (GPU only). ``--rows 2 4 8``: small decode batches instead, the
row kernels at their default sizes against cuBLAS at each. ``--prefetch-gaps 0 4 8``: the
row kernels with a wait of that many µs a layer where attention runs (a sleeping kernel: the
memory system idle), each way of asking L2 for the later matmuls' weights during it
(``braid_engine/kernels/prefetch.py``) against none.

    python -m benchmarks.row_kernels [--rows 1 2 4 8] [--prefetch-gaps 0 4 8]

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


def row_step(ws, x, r, o_in, configs):
    c_qkv, c_o, c_gu, c_down = configs
    for lw in ws:
        _, r = gemv.norm_matmul(x, r, lw["n1"], 1e-6, lw["qkv"], config=c_qkv)
        h = gemv.row_matmul(o_in, lw["o"], config=c_o)
        gu, r = gemv.norm_matmul(h, r, lw["n2"], 1e-6, lw["gu"], config=c_gu)
        x = gemv.silu_matmul(gu, lw["down"], config=c_down)
    return x


# ways of asking L2 for this layer's o_proj, gate_up and down weights after its qkv matmul:
# (bytes a lane asks for, a line at a time, evict_last, on a stream of its own instead of in the
# chain of programmatic launches)
PREFETCH_WAYS = {"none": None, "bulk 16K, chained": (16384, False, False, False),
                 "bulk 16K, own stream": (16384, False, False, True), "bulk 2K, own stream": (2048, False, False, True),
                 "lines 2K, chained": (2048, True, False, False), "lines 2K, own stream": (2048, True, False, True),
                 "lines 2K evict_last, own stream": (2048, True, True, True)}


def gap_step(ws, x, r, o_in, cycles: int, way, side: torch.cuda.Stream):
    from braid_engine.kernels.prefetch import l2_prefetch

    main = torch.cuda.current_stream()
    for lw in ws:
        _, r = gemv.norm_matmul(x, r, lw["n1"], 1e-6, lw["qkv"])
        if way is not None:
            chunk, lines, evict_last, own = way
            if own:
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    l2_prefetch(lw["o"], lw["gu"], lw["down"], chunk=chunk, lines=lines, evict_last=evict_last,
                                chained=False)
            else:
                l2_prefetch(lw["o"], lw["gu"], lw["down"], chunk=chunk, lines=lines, evict_last=evict_last)
        if cycles:
            torch.cuda._sleep(cycles)  # where the attention kernels would run
        h = gemv.row_matmul(o_in, lw["o"])
        gu, r = gemv.norm_matmul(h, r, lw["n2"], 1e-6, lw["gu"])
        x = gemv.silu_matmul(gu, lw["down"])
    if way is not None and way[3]:
        main.wait_stream(side)  # joined once, at the end (a graph must end on its capturing stream)
    return x


def by_gaps(ws, gaps: list[float], reps: int) -> None:
    n = len(ws)
    x, r = (torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o_in = torch.randn(1, Q, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    probe = 20_000

    def sleeps():
        for _ in range(n):
            torch.cuda._sleep(probe)

    per_cycle = graph_time(sleeps, reps) / n / probe
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; {n} layers; µs a layer (the gap "
          f"included) in one CUDA graph, this layer's o_proj, gate_up, down weights asked of L2 after its qkv "
          f"matmul each way; a sleeping kernel of {probe} cycles takes {probe * per_cycle * 1e6:.2f} µs")
    print(f"{'way':>32} " + " ".join(f"{f'gap {g:g} µs':>16}" for g in gaps))
    # the bound on what prefetching can give: every layer on the first layer's weights (31 MB, in L2
    # after the first replay), no prefetch
    resident = [graph_time(lambda c=int(g * 1e-6 / per_cycle): gap_step([ws[0]] * n, x, r, o_in, c, None, side), reps)
                / n * 1e6 for g in gaps]
    for name, way in PREFETCH_WAYS.items():
        times = [graph_time(lambda c=int(g * 1e-6 / per_cycle), w=way: gap_step(ws, x, r, o_in, c, w, side), reps)
                 / n * 1e6 for g in gaps]
        if way is None:
            base = times
        print(f"{name:>32} " + " ".join(f"{t:>8.2f} ({b / t:.2f}x)" for t, b in zip(times, base, strict=True)),
              flush=True)
    print(f"{'one layer of weights (in L2)':>32} " + " ".join(f"{t:>8.2f} ({b / t:.2f}x)"
                                                            for t, b in zip(resident, base, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rows", type=int, nargs="*", default=None,
                    help="rows a step (a decode batch): the default kernels against cuBLAS at each")
    ap.add_argument("--prefetch-gaps", type=float, nargs="*", default=None,
                    help="µs a layer where attention would run: the row kernels with each way of prefetching "
                         "the later matmuls' weights into L2 during it, against none")
    args = ap.parse_args()
    ws = layers(args.layers)
    if args.prefetch_gaps:
        by_gaps(ws, args.prefetch_gaps, args.reps)
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
    for name, (configs, pdl) in variants.items():
        kernels.PDL = pdl
        t = graph_time(lambda configs=configs: row_step(ws, x, r, o_in, configs), args.reps)
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
