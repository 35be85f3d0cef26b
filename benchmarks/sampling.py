"""What drawing a decode step's tokens costs, by filter (GPU only): the engine's
``sampling.RowSampler`` on a step's logits [batch, 151,936] (Qwen3's vocabulary), each setting
its GPU time (the draw captured in a CUDA graph, replays back to back) and the host's time to
launch it (eager calls, no waiting), against the greedy argmax. Inside a decode burst the host
launches each step's draw between two replays, so a step costs at least the larger of the two.
Each setting three ways: in torch (``fused=False``), with the race in our kernels (the engine's
default, ``kernels.FUSED_SAMPLING``), and with top-k's threshold from ours too (``kernels.FUSED_TOP_K``);
top-p after top-k both cut among the top-k values (``sampling.SORT_FREE_TOP_P`` on, the CPU's way),
with the whole row sorted (off, the GPU's way), and by its keep rule from our kernels (``kernels.FUSED_TOP_P``,
``kernels/topp.py``: no sort, the race applying the rule).

    python -m benchmarks.sampling [--batch 1 8 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import graph_time
from braid_engine import sampling
from braid_engine.sampling import RowSampler, SamplingParams

VOCAB = 151_936
SETTINGS = {
    "greedy (argmax)": SamplingParams(temperature=0),
    "temperature 0.7": SamplingParams(temperature=0.7),
    "+ top-k 20": SamplingParams(temperature=0.7, top_k=20),
    "+ top-p 0.95": SamplingParams(temperature=0.7, top_p=0.95),
    "+ top-p 0.95, top-k 20": SamplingParams(temperature=0.7, top_p=0.95, top_k=20),
    "+ min-p 0.05": SamplingParams(temperature=0.7, min_p=0.05),
}


def host_time(fn, reps: int = 200) -> float:
    """Seconds the host takes to launch ``fn`` (median of 5 runs of reps, no waiting in between)."""
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
        torch.cuda.synchronize()
    return sorted(times)[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}; vocabulary {VOCAB}; µs a step "
          f"(GPU: in a CUDA graph; host: launching it)")
    print(f"{'setting [way]':>38} " + " ".join(f"{f'b{b} GPU':>9} {f'b{b} host':>9}" for b in args.batch))
    logits = {b: torch.randn(b, VOCAB, device=dev) * 4 for b in args.batch}
    # (fused, top_k_kernel, SORT_FREE_TOP_P, top_p_kernel)
    ways = {"torch": (False, False, True, False), "race kernel": (True, False, True, False),
            "+ k-th kernel": (True, True, True, False), "race kernel, row sorted": (True, False, False, False),
            "+ top-p kernels": (True, False, False, True)}
    for name, params in SETTINGS.items():
        for way, (fused, kth, sort_free, top_p) in ways.items():
            nucleus_in_top_k = params.top_k > 0 and params.top_p < 1
            if (params.greedy and fused or kth and params.top_k <= 0 or not sort_free and not nucleus_in_top_k
                    or top_p and not nucleus_in_top_k):
                continue
            cells = []
            for b in args.batch:
                sampling.SORT_FREE_TOP_P = sort_free  # (read as the sampler is made)
                sampler = RowSampler([params] * b, [None] * b, VOCAB, dev, fused=fused, top_k_kernel=kth,
                                     top_p_kernel=top_p)
                sampling.SORT_FREE_TOP_P = None
                x = logits[b]
                gpu = graph_time(lambda s=sampler, x=x: s(x), 50)
                host = host_time(lambda s=sampler, x=x: s(x))
                cells.append(f"{gpu * 1e6:>9.1f} {host * 1e6:>9.1f}")
            print(f"{name + ' [' + way + ']':>38} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
