"""Batch-1 (and small-batch) decode attention under a CUDA graph: FlashInfer's decode kernel
as the engine's graphs plan it (split-KV always, plus a merge pass) against its other plans —
no split (planned without graph mode, then captured), the tensor-core decode with the
split disabled — and our own split-KV Triton kernel (`braid_engine/kernels/decode_attention.py`)
(GPU only).

    python -m benchmarks.decode_attention [--batch 1 4] [--kv 128 256 1024 4096] [--sweep]

``--sweep`` times only ours, over split counts, tile sizes, warps and pipeline stages, and
where the engine's settings (``braid_engine.kernels.SPLIT_KV_CONFIG``) rank among them.

Qwen3-0.6B attention (16 q / 8 kv heads, head dim 128, bf16, HND, page 16); each replay runs
28 layers' attention over 28 distinct caches, as a decode step does. Prints µs a layer.
"""

from __future__ import annotations

import argparse

import flashinfer
import torch

from benchmarks.common import graph_time
from braid_engine import kernels
from braid_engine.kernels.decode_attention import DecodeAttention

HQ, HKV, D, PS, LAYERS = 16, 8, 128, 16, 28
WS = 128 << 20


def _case(b: int, kv: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """b sequences of kv keys each: 28 layers' caches, q, the shuffled page indices [b, pages]
    (int32, host) and the kv lengths (device)."""
    dev, bf = "cuda", torch.bfloat16
    pages = -(-kv // PS)
    caches = [torch.randn(b * pages + 1, 2, HKV, PS, D, device=dev, dtype=bf) for _ in range(LAYERS)]
    q = torch.randn(b, HQ, D, device=dev, dtype=bf)
    table = torch.randperm(b * pages, dtype=torch.int32).reshape(b, pages)
    return caches, q, table, torch.full((b,), kv, dtype=torch.int32, device=dev)


def _time_ours(op: DecodeAttention, q, caches, table, lens, reps: int = 100) -> float:
    """µs a layer of our kernel under a CUDA graph over the 28 layers' caches."""
    def step() -> None:
        for cache in caches:
            op(q, cache, table, lens, D ** -0.5)

    return graph_time(step, reps=reps) / LAYERS * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--kv", type=int, nargs="+", default=[128, 256, 1024, 4096])
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    dev, bf = "cuda", torch.bfloat16
    if args.sweep:
        return sweep(args.batch, args.kv)
    print(f"card: {torch.cuda.get_device_name()}, flashinfer {flashinfer.__version__}")
    print(f"{'batch':>5} {'kv':>6} {'graph plan (split+merge)':>25} {'no split':>9} {'tensor cores, no split':>23} "
          f"{'tensor cores, split':>20} {'triton (ours)':>14}  (µs a layer)")
    common = dict(num_qo_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=PS, pos_encoding_mode="NONE",
                  q_data_type=bf, kv_data_type=bf)
    for b in args.batch:
        for kv in args.kv:
            caches, q, host_table, lens = _case(b, kv)
            pages = host_table.shape[1]
            indptr = torch.arange(b + 1, dtype=torch.int32) * pages
            indices = host_table.reshape(-1)
            last = torch.full((b,), kv - (pages - 1) * PS, dtype=torch.int32)

            def wrapper(graph: bool, tc: bool, b: int = b, pages: int = pages):
                bufs = {}
                if graph:
                    bufs = dict(paged_kv_indptr_buffer=torch.zeros(b + 1, dtype=torch.int32, device=dev),
                                paged_kv_indices_buffer=torch.zeros(b * pages, dtype=torch.int32, device=dev),
                                paged_kv_last_page_len_buffer=torch.zeros(b, dtype=torch.int32, device=dev))
                return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    torch.zeros(WS, dtype=torch.uint8, device=dev), "HND", use_cuda_graph=graph,
                    use_tensor_cores=tc, **bufs)

            results, outs = [], []
            for graph, tc, extra in ((True, False, {}), (False, False, {}), (True, True, {"disable_split_kv": True}),
                                     (True, True, {})):
                w = wrapper(graph, tc)
                w.plan(indptr, indices, last, **common, **extra)

                def step(w=w, q=q, caches=caches):
                    for c in caches:
                        w.run(q, c)

                results.append(graph_time(step) / LAYERS * 1e6)
                outs.append(w.run(q, caches[0]).float())
            ours, table = DecodeAttention(b, HQ, HKV, D, torch.device(dev)), host_table.to(dev)
            results.append(_time_ours(ours, q, caches, table, lens))
            outs.append(ours(q, caches[0], table, lens, D ** -0.5).float())
            err = max(((o - outs[0]).norm() / outs[0].norm()).item() for o in outs[1:])
            print(f"{b:>5} {kv:>6} {results[0]:>25.2f} {results[1]:>9.2f} {results[2]:>23.2f} {results[3]:>20.2f}"
                  f" {results[4]:>14.2f}  (outputs agree to {err:.1e})")


def sweep(batches: list[int], kvs: list[int]) -> None:
    import itertools

    dev = "cuda"
    default = tuple(kernels.SPLIT_KV_CONFIG)
    # the grid, and the engine's settings where it lacks them
    configs = list(dict.fromkeys([*itertools.product((16, 32, 64), (32, 64, 128), (2, 4), (1, 2, 3)), default]))
    print(f"card: {torch.cuda.get_device_name()}; ours, µs a layer; config = splits/block_t/warps/stages; "
          f"the engine's {_label(default)}")
    best: dict[tuple, list[float]] = {c: [] for c in configs}
    for b in batches:
        for kv in kvs:
            caches, q, table, lens = _case(b, kv)
            table = table.to(dev)
            row = []
            for c in configs:
                ours = DecodeAttention(b, HQ, HKV, D, torch.device(dev), splits=c[0], block_t=c[1],
                                       num_warps=c[2], num_stages=c[3])
                t = _time_ours(ours, q, caches, table, lens, reps=50)
                best[c].append(t)
                row.append((t, c))
            row.sort()
            print(f"batch {b} kv {kv}: " + ", ".join(f"{_label(c)} {t:.2f}" for t, c in row[:6])
                  + f"; the engine's {best[default][-1]:.2f} ({_rank(row, default)})")
    total = sorted((sum(v), c) for c, v in best.items())
    print("best over all shapes (sum of µs): " + ", ".join(f"{_label(c)} {t:.1f}" for t, c in total[:8])
          + f"; the engine's {sum(best[default]):.1f} ({_rank(total, default)})")


def _label(config: tuple) -> str:
    return "/".join(map(str, config))


def _rank(ranked: list[tuple[float, tuple]], config: tuple) -> str:
    """``config``'s place among ``ranked`` (time, config) pairs, fastest first: '#3 of 55'."""
    return f"#{[c for _, c in ranked].index(config) + 1} of {len(ranked)}"


if __name__ == "__main__":
    main()
