"""A prompt step's matmuls, 28 Qwen3-0.6B layers under one CUDA graph: cuBLAS against our Triton
GEMM (``braid_engine/kernels/gemm.py``) at a few tile sizes, and gate_up followed by the SiLU·mul
kernel against gate_up with SiLU·mul folded into its epilogue (GPU only, Hopper: TMA).

    python -m benchmarks.prefill_gemm [--tokens 1024 4096]

Weights are distinct per layer, as in a forward. Each row says µs for the 28 layers, TFLOP/s,
and the ratio to cuBLAS (> 1: ours faster); outputs are checked against cuBLAS's.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from benchmarks.common import card, graph_time
from braid_engine.kernels import gemm
from braid_engine.kernels.activation import silu_and_mul

LAYERS, HIDDEN, INTER = 28, 1024, 3072
SHAPES = {"qkv": (4096, HIDDEN), "o_proj": (HIDDEN, 2048), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
C = gemm.GemmConfig
PLAIN = [C(128, 256, 64, 8, 8, 3), C(128, 256, 64, 8, 8, 4), C(128, 128, 64, 8, 4, 4), C(64, 256, 64, 8, 4, 4),
         C(128, 256, 64, 8, 8, 3, 1), C(128, 256, 64, 8, 8, 4, 1), C(128, 128, 64, 8, 4, 4, 2), C(64, 256, 64, 8, 4, 4, 2),
         C(128, 256, 64, 8, 8, 3, 1, True), C(128, 128, 64, 8, 4, 4, 2, True)]
SILU = [C(256, 64, 64, 8, 8, 3), C(64, 128, 64, 8, 4, 4), C(128, 64, 64, 8, 4, 4), C(128, 128, 64, 8, 8, 3, 1),
        C(128, 64, 64, 8, 4, 4, 2), C(64, 128, 64, 8, 4, 4, 2), C(256, 64, 64, 8, 8, 3, 1), C(128, 128, 64, 8, 8, 3, 1, True),
        C(128, 64, 64, 8, 4, 4, 2, True)]


def _time(op, x: torch.Tensor, ws: list[torch.Tensor]) -> float | None:
    """µs for ``op(x, w)`` over every layer's weight, under one graph."""
    try:
        return graph_time(lambda: [op(x, w) for w in ws], reps=20) * 1e6
    except Exception as e:  # a tile size that does not fit in shared memory, or fails to compile
        print(f"    (failed: {type(e).__name__}: {str(e).splitlines()[0][:100]})")
        torch.cuda.synchronize()
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    args = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    print(f"card: {card(dev)}; bf16; {LAYERS} layers, distinct weights; µs for all layers")
    weights = {name: [torch.randn(n, k, device=dev, dtype=bf) * 0.02 for _ in range(LAYERS)]
               for name, (n, k) in SHAPES.items()}
    for m in args.tokens:
        for name, (n, k) in SHAPES.items():
            x = torch.randn(m, k, device=dev, dtype=bf)
            ws = weights[name]
            flops = 2 * m * n * k * LAYERS
            base = _time(F.linear, x, ws)
            ref = F.linear(x, ws[0]).float()
            print(f"{m:>5} tokens {name:<8} cuBLAS {base:9.1f} µs {flops / base / 1e6:6.0f} TFLOP/s")
            for c in PLAIN:
                t = _time(functools.partial(gemm.matmul, config=c), x, ws)
                if t is None:
                    continue
                err = ((gemm.matmul(x, ws[0], c).float() - ref).norm() / ref.norm()).item()
                print(f"      ours {str(c):<27} {t:9.1f} µs {flops / t / 1e6:6.0f} TFLOP/s "
                      f"{base / t:5.2f}x  (rel. diff {err:.1e})")
        x = torch.randn(m, HIDDEN, device=dev, dtype=bf)
        ws = weights["gate_up"]
        flops = 2 * m * 2 * INTER * HIDDEN * LAYERS
        base = _time(lambda a, w: silu_and_mul(F.linear(a, w)), x, ws)
        ref = silu_and_mul(F.linear(x, ws[0])).float()
        print(f"{m:>5} tokens gate_up + SiLU·mul: cuBLAS + kernel {base:9.1f} µs {flops / base / 1e6:6.0f} TFLOP/s")
        for c in SILU:
            t = _time(functools.partial(gemm.gate_up_silu, config=c), x, ws)
            if t is None:
                continue
            err = ((gemm.gate_up_silu(x, ws[0], c).float() - ref).norm() / ref.norm()).item()
            print(f"      folded {str(c):<27} {t:9.1f} µs {flops / t / 1e6:6.0f} TFLOP/s "
                  f"{base / t:5.2f}x  (rel. diff {err:.1e})")


if __name__ == "__main__":
    main()
