"""What a dependency between two steps of a batch-1 layer costs on the GPU, two ways (GPU only):
a kernel boundary under programmatic dependent launch (the engine's chain: each kernel starts
while the one before finishes and waits for it), against a grid-wide barrier inside one
persistent kernel (every program adds to a counter and spins until all have), the way a single
kernel a layer would order its matmuls.

    python -m benchmarks.grid_barrier [--programs 132 264] [--rounds 200]

µs a dependency = (time of ``rounds`` dependencies − time of one) / (rounds − 1), each in one
CUDA graph; programs: how many programs take part (132 = one an SM on an H100).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.common import graph_time


@triton.jit
def _barriers_kernel(count_ptr, out_ptr, rounds):
    n = tl.num_programs(0)
    seen = 0
    for i in range(rounds):
        tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        while seen < (i + 1) * n:
            seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
    tl.store(out_ptr + tl.program_id(0), seen)


@triton.jit
def _hop_kernel(out_ptr):
    tl.extra.cuda.gdc_launch_dependents()
    tl.extra.cuda.gdc_wait()
    tl.store(out_ptr + tl.program_id(0), tl.program_id(0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, nargs="+", default=[132, 264])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    count = torch.zeros(1, dtype=torch.int32, device="cuda")
    r = args.rounds
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs; µs a dependency")
    print(f"{'programs':>8} {'PDL kernel boundary':>20} {'grid barrier':>13}")
    for p in args.programs:
        out = torch.zeros(p, dtype=torch.int32, device="cuda")

        def hops(k: int, p=p, out=out):
            for _ in range(k):
                _hop_kernel[(p,)](out, launch_pdl=True)

        def barriers(k: int, p=p, out=out):
            count.zero_()
            _barriers_kernel[(p,)](count, out, k)

        hop = (graph_time(lambda: hops(r), args.reps) - graph_time(lambda: hops(1), args.reps)) / (r - 1)
        bar = (graph_time(lambda: barriers(r), args.reps) - graph_time(lambda: barriers(1), args.reps)) / (r - 1)
        barriers(r)
        torch.cuda.synchronize()
        assert int(out.min()) >= r * p  # every program saw every arrival of the last round
        print(f"{p:>8} {hop * 1e6:>20.2f} {bar * 1e6:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
