"""Where a step's time goes: per-phase wall time of the engine loop (GPU synchronised at each
phase boundary) for batch-1 decode and for one turn of a long conversation, plus the top
Python functions. A diagnostic for speed work, not a benchmark.

    python -m benchmarks.profile_step --shape qwen3-0.6b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections import defaultdict

import torch

import braid_engine.engine.engine as engine_module
from benchmarks.common import (
    add_pipeline_argument,
    build_model,
    card,
    kv_kwargs,
    model_arguments,
    pipeline_setting,
    sync,
)
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
    eng.runner.launch_burst = timed("decode burst (plan + steps)", eng.runner.launch_burst)
    eng.runner.backend.plan = timed("  plan (eager)", eng.runner.backend.plan)
    if hasattr(eng.runner.backend, "plan_graph"):
        eng.runner.backend.plan_graph = timed("  plan (graph)", eng.runner.backend.plan_graph)
    engine_module.sample = timed("sample", engine_module.sample)
    eng._append = timed("append + detokenize + emit", eng._append)
    eng.step = timed("step (total)", eng.step)


def profile_steps(llm: LLM) -> tuple[cProfile.Profile, object]:
    """Profile every engine step from now on; returns the profile and the unprofiled step.
    cProfile sees only its own thread, so the profiling runs inside the loop thread's step."""
    prof = cProfile.Profile()
    step = llm.engine.step

    def profiled_step() -> None:
        prof.enable()
        try:
            step()
        finally:
            prof.disable()

    llm.engine.step = profiled_step
    return prof, step


def _timeline(llm: LLM) -> list[tuple[str, float]]:
    """Record when a request is added, each step starts and ends, and each output is put."""
    events: list[tuple[str, float]] = []
    eng = llm.engine

    def mark(name, fn):
        def wrapper(*args, **kwargs):
            events.append((f"{name} begins", time.perf_counter()))
            out = fn(*args, **kwargs)
            events.append((f"{name} ends", time.perf_counter()))
            return out
        return wrapper

    eng.add_request = mark("add_request", eng.add_request)
    eng.step = mark("step", eng.step)
    eng._emit = mark("emit", eng._emit)
    return events


def _first_token(llm: LLM, prompt: list[int], phases: dict[str, float],
                 timeline: list[tuple[str, float]], label: str) -> None:
    """Time to the first token of ``prompt``, its phases, its timeline and its Python profile."""
    phases.clear()
    timeline.clear()
    prof, step = profile_steps(llm)
    t0 = time.perf_counter()
    first = next(iter(llm.stream(prompt, SamplingParams(temperature=0, max_tokens=1))))
    ttft = time.perf_counter() - t0
    while not llm.engine.idle:
        time.sleep(0.001)
    llm.engine.step = step
    print(f"{label} at {len(prompt)} tokens ({first.num_cached_tokens} reused): first token {ttft * 1e3:.2f} ms")
    for name, t in dict(phases).items():
        print(f"  {name:<32} {t * 1e3:8.3f} ms")
    for name, t in timeline:
        print(f"  at {(t - t0) * 1e3:8.3f} ms: {name}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def _gpu_idle_outside_replays(llm: LLM, batches: list[int], vocab: int) -> None:
    """How much of a decode run's GPU timeline lies outside graph replays, the GPU waiting for
    the host to read the last burst's tokens, check stops, schedule and plan the next: a CUDA
    event before and after every replay (the one before is reached when the GPU gets there, so
    back-to-back replays each measure their own work). What overlapping bursts could win."""
    replay = torch.cuda.CUDAGraph.replay
    spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed(graph) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay(graph)
        end.record()
        spans.append((start, end))

    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for b in batches:
        prompts = [torch.randint(3, vocab, (128,), generator=gen).tolist() for _ in range(b)]
        llm.generate(prompts, params)  # warm
        spans.clear()
        bursts = llm.stats()["decode_bursts"]
        torch.cuda.CUDAGraph.replay = timed
        try:
            llm.generate(prompts, params)
        finally:
            torch.cuda.CUDAGraph.replay = replay
        torch.cuda.synchronize()
        if not spans:
            print(f"batch {b}: no graph replays")
            continue
        total = spans[0][0].elapsed_time(spans[-1][1])
        busy = sum(s.elapsed_time(e) for s, e in spans)
        print(f"batch {b}: {len(spans)} replays in {llm.stats()['decode_bursts'] - bursts} bursts over "
              f"{total:.1f} ms; GPU idle outside replays {1 - busy / total:.1%} "
              f"({(total - busy) / len(spans) * 1e3:.0f} µs a replay)")


def _kernel_table(path, args) -> None:
    """GPU time per kernel over 20 eager decode steps at each of ``--kernel-batch`` (the graphs
    run the same kernels)."""
    from torch.profiler import ProfilerActivity, profile

    llm = LLM(path, device=args.device, dtype=args.dtype, kv_cache_memory=2 << 30, cuda_graphs=False)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for batch in args.kernel_batch:
        prompts = [list(range(3 + i, 131 + i)) for i in range(batch)]  # 128 tokens each, all different
        llm.generate(prompts, params)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, params)
        print(f"kernels of 20 decode steps at batch {batch} (128-token prompts), eager:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        llm.engine.clear_cache()
    history = list(range(3, 3 + args.history))
    llm.generate([history], SamplingParams(temperature=0, max_tokens=1))
    turn = history + list(range(5000, 5065))
    llm.generate([turn[:-3]], SamplingParams(temperature=0, max_tokens=1))  # same shapes, warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = llm.generate([turn], SamplingParams(temperature=0, max_tokens=1))[0]
    print(f"kernels of one prefill of {len(turn) - out.num_cached_tokens} tokens after "
          f"{out.num_cached_tokens} cached:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    llm.engine.clear_cache()
    for first in (30000, 40000):  # a warm-up prompt, then the profiled one; nothing cached
        fresh = list(range(first, first + 4096))
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            llm.generate([fresh], SamplingParams(temperature=0, max_tokens=1))
            wall = time.perf_counter() - t0
    print(f"kernels of one fresh 4096-token prefill ({wall * 1e3:.2f} ms wall):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    llm.shutdown()


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--history", type=int, default=8000)
    ap.add_argument("--kernel-batch", type=int, nargs="+", default=[1, 32],
                    help="decode batch sizes of the GPU kernel tables")
    add_pipeline_argument(ap)
    args = ap.parse_args()
    path = build_model(args.shape, args.model)
    llm = LLM(path, device=args.device, dtype=args.dtype, pipeline_bursts=pipeline_setting(args),
              **(kv_kwargs(args) or {"kv_cache_memory": 8 << 30}))
    dev = llm.config.device
    print(f"card: {card(dev)}; attention {llm.config.attention_backend}; graphs {sorted(llm.engine.runner.graphs)}"
          f"{'; bursts pipelined' if llm.engine.config.pipeline_bursts else ''}")
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
    prof, step = profile_steps(llm)
    llm.generate([prompt], decode)
    llm.engine.step = step
    instrument(llm, phases)
    llm.generate([prompt], decode)
    print(f"batch-1 decode, per token (synchronised at each phase), {args.steps} tokens, "
          f"{llm.stats()['decode_bursts']} bursts so far:")
    for name, t in phases.items():
        print(f"  {name:<32} {t / args.steps * 1e3:8.3f} ms")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)

    history = torch.randint(3, vocab, (args.history,), generator=gen).tolist()
    llm.generate([history], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    out = llm.generate([history], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    turn = history + out.token_ids + torch.randint(3, vocab, (64,), generator=gen).tolist()
    timeline = _timeline(llm)
    _first_token(llm, turn, phases, timeline, "one turn")
    fresh = torch.randint(3, vocab, (1024,), generator=gen).tolist()
    llm.generate([torch.randint(3, vocab, (1024,), generator=gen).tolist()],
                 SamplingParams(temperature=0, max_tokens=1))  # the same shapes, warm
    _first_token(llm, fresh, phases, timeline, "one fresh prompt")
    if dev.type == "cuda":
        _gpu_idle_outside_replays(llm, sorted({*args.kernel_batch, 8, 128}), vocab)
        _kernel_table(path, args)
    llm.shutdown()


if __name__ == "__main__":
    main()
