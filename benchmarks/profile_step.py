"""Where a step's time goes: per-phase wall time of the engine loop (GPU synchronised at each
phase boundary) for batch-1 decode and for one turn of a long conversation, plus the top
Python functions. A diagnostic for speed work, not a benchmark.

    python -m benchmarks.profile_step --shape qwen3-0.6b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict

import torch

import braid_engine.engine.engine as engine_module
from benchmarks.common import build_model, card, sync
from braid_engine import LLM, SamplingParams


def instrument(llm: LLM, phases: dict[str, float]) -> None:
    dev = llm.config.device

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync(dev)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(dev)
            phases[name] += time.perf_counter() - t0
            return out
        return wrapper

    eng = llm.engine
    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    eng.runner.execute = timed("execute (plan + forward)", eng.runner.execute)
    eng.runner.backend.plan = timed("  plan (eager)", eng.runner.backend.plan)
    if hasattr(eng.runner.backend, "plan_graph"):
        eng.runner.backend.plan_graph = timed("  plan (graph)", eng.runner.backend.plan_graph)
    engine_module.sample = timed("sample", engine_module.sample)
    eng._append = timed("append + detokenize + emit", eng._append)
    eng.step = timed("step (total)", eng.step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-0.6b"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--history", type=int, default=8000)
    args = ap.parse_args()
    path = build_model(args.shape, args.model)
    llm = LLM(path, device=args.device, dtype=args.dtype, kv_cache_memory=8 << 30)
    dev = llm.config.device
    print(f"card: {card(dev)}; attention {llm.config.attention_backend}; graphs {sorted(llm.engine.runner.graphs)}")
    vocab = len(llm.tokenizer)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (128,), generator=gen).tolist()
    decode = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    llm.generate([prompt], decode)  # warm-up
    t0 = time.perf_counter()
    llm.generate([prompt], decode)
    plain = time.perf_counter() - t0
    print(f"batch-1 decode, uninstrumented: {plain / args.steps * 1e3:.3f} ms/token "
          f"({args.steps / plain:.0f} tokens/s)")

    phases: dict[str, float] = defaultdict(float)
    prof = cProfile.Profile()
    step = llm.engine.step

    def profiled_step() -> None:  # cProfile sees only its own thread: profile the loop thread
        prof.enable()
        try:
            step()
        finally:
            prof.disable()

    llm.engine.step = profiled_step
    llm.generate([prompt], decode)
    llm.engine.step = step
    instrument(llm, phases)
    llm.generate([prompt], decode)
    print(f"batch-1 decode, per step (synchronised at each phase), {args.steps} steps:")
    for name, t in phases.items():
        print(f"  {name:<32} {t / args.steps * 1e3:8.3f} ms")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)

    history = torch.randint(3, vocab, (args.history,), generator=gen).tolist()
    llm.generate([history], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    out = llm.generate([history], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    turn = history + out.token_ids + torch.randint(3, vocab, (64,), generator=gen).tolist()
    phases.clear()
    t0 = time.perf_counter()
    first = next(iter(llm.stream(turn, SamplingParams(temperature=0, max_tokens=1))))
    ttft = time.perf_counter() - t0
    print(f"one turn at {len(turn)} tokens ({first.num_cached_tokens} reused): first token {ttft * 1e3:.2f} ms")
    for name, t in phases.items():
        print(f"  {name:<32} {t * 1e3:8.3f} ms")
    llm.shutdown()


if __name__ == "__main__":
    main()
