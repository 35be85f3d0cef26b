"""Time each fused Triton kernel against its torch twin at Qwen3-0.6B shapes (GPU only).

    python benchmarks/kernels.py [--tokens 1 32 2048]

Median of ``triton.testing.do_bench`` after warm-up; GB/s counts each kernel's compulsory
bytes (inputs read once, outputs written once), so it says how close to the card's bandwidth
each side runs.
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from braid_engine.kernels.activation import silu_and_mul, silu_and_mul_ref
from braid_engine.kernels.qk_norm_rope import qk_norm_rope_write_kv, qk_norm_rope_write_kv_ref
from braid_engine.kernels.rmsnorm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from braid_engine.models.layers import RotaryEmbedding

HIDDEN, INTER, HQ, HKV, D, PS = 1024, 3072, 16, 8, 128, 16


def cases(t: int):
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(t, HIDDEN, device=dev, dtype=bf)
    r = torch.randn(t, HIDDEN, device=dev, dtype=bf)
    w = torch.rand(HIDDEN, device=dev, dtype=bf) + 0.5
    yield "rms_norm", (lambda: rms_norm(x, w, 1e-6)), (lambda: rms_norm_ref(x, w, 1e-6)), 2 * x.nbytes
    yield ("add_rms_norm", (lambda: add_rms_norm(x, r, w, 1e-6)), (lambda: add_rms_norm_ref(x, r, w, 1e-6)),
           4 * x.nbytes)
    gu = torch.randn(t, 2 * INTER, device=dev, dtype=bf)
    yield "silu_and_mul", (lambda: silu_and_mul(gu)), (lambda: silu_and_mul_ref(gu)), gu.nbytes * 3 // 2
    qkv = torch.randn(t, (HQ + 2 * HKV) * D, device=dev, dtype=bf)
    qw = torch.rand(D, device=dev, dtype=bf) + 0.5
    kw = torch.rand(D, device=dev, dtype=bf) * 96.5
    rope = RotaryEmbedding(D, 1e6, 40960, interleaved=False).to(dev)
    pos = torch.randint(0, 4096, (t,), device=dev)
    pages = -(-t // PS) + 1
    cache = torch.zeros(pages, 2, HKV, PS, D, device=dev, dtype=bf)
    slots = torch.randperm(pages * PS, device=dev)[:t]
    args = (qkv, pos, qw, kw, 1e-6, rope.cos, rope.sin, cache, slots, HQ, HKV)
    yield ("qk_norm_rope_write_kv", (lambda: qk_norm_rope_write_kv(*args)),
           (lambda: qk_norm_rope_write_kv_ref(*args)), 2 * qkv.nbytes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 2048])
    args = ap.parse_args()
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'kernel':24s} {'tokens':>6s} {'triton µs':>10s} {'torch µs':>10s} {'speed-up':>8s} "
          f"{'triton GB/s':>11s} {'torch GB/s':>10s}")
    for t in args.tokens:
        for name, fused, ref, nbytes in cases(t):
            tf = do_bench(fused, warmup=25, rep=100, return_mode="median") * 1e3
            tr = do_bench(ref, warmup=25, rep=100, return_mode="median") * 1e3
            print(f"{name:24s} {t:6d} {tf:10.2f} {tr:10.2f} {tr / tf:7.2f}x "
                  f"{nbytes / tf / 1e3:11.1f} {nbytes / tr / 1e3:10.1f}")


if __name__ == "__main__":
    main()
