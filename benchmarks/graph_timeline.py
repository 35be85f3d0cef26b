"""Where a decode step's (or a fresh prompt's) time goes inside its CUDA graph: every kernel of
the replays, in order.

The engine's decode graphs run ~7 kernels a decoder layer; at batch 1 a step takes ~2.5× the
time its weights take to stream. A profile of eager steps (profile_step.py) gives each kernel's own
duration, but on Hopper the kernels are programmatic dependents of the one before (they start,
load their weights and wait), so durations overlap and do not add up to the step. This reads the
kernels that graph replays run (CUPTI records them one by one) and charges each kernel the time
from its start to the next kernel's start: those shares add up to the step exactly, and a kernel
whose share exceeds its weights' streaming time is where the step waits. The graph is replayed
back to back on the plan of a real step, so nothing but the graph launches lies between steps.

    python -m benchmarks.graph_timeline --shape qwen3-0.6b --device cuda --dtype bfloat16 --batch 1 8 32
    python -m benchmarks.graph_timeline ... --batch --prefill 1024 4096

With ``--prefill`` a fresh prompt of each length (one prefill graph, no cache) is timed through
``generate`` and as its graph replays alone: the difference is what lies outside the graph (the
host's step, the copies, the sampling and the hand-offs between threads). ``--host-profile N``
then runs a fresh N-token prompt's steps in this thread under cProfile (the engine's loop thread
kept out) and prints where the host's time goes.

Kernels that occur a multiple of the layer count per step are told apart by their place in the
layer (``_row_matmul_kernel [0]`` … ``[3]``: qkv, o_proj, gate_up, down at batch 1).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.common import build_model, card, kv_kwargs, model_arguments, now, replay_time
from braid_engine import LLM, SamplingParams


@dataclass
class Row:
    label: str
    per_step: int  # occurrences in one step
    duration_us: float  # median of the kernel's own duration
    share_us: float  # median time from its start to the next kernel's start, summed over a step


def analyse(events: list[tuple[str, float, float]], steps: int, layers: int) -> tuple[list[Row], float, float]:
    """``events``: (kernel name, start µs, end µs) of ``steps`` replays of one graph, any order.
    Returns the rows (largest share first), the median step (first kernel to the next step's
    first kernel) and the median time between a step's last kernel's end and the next step's
    first kernel's start (the GPU idle between replays). Raises ValueError when the kernels do
    not split into ``steps`` identical sequences."""
    events = sorted(events, key=lambda e: e[1])
    if steps < 2 or len(events) % steps:
        raise ValueError(f"{len(events)} kernels do not split into {steps} steps (need 2 or more)")
    n = len(events) // steps
    chunks = [events[i * n:(i + 1) * n] for i in range(steps)]
    names = [e[0] for e in chunks[0]]
    if any([e[0] for e in c] != names for c in chunks):
        raise ValueError("the steps do not run the same kernels in the same order")
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    seen: dict[str, int] = {}
    labels = []
    for name in names:
        i = seen.get(name, 0)
        seen[name] = i + 1
        c = counts[name]
        per_layer = c // layers if c % layers == 0 else 0
        labels.append(f"{name} [{i % per_layer}]" if per_layer > 1 else name)
    durations: dict[str, list[float]] = {}
    shares: dict[str, list[float]] = {}
    step_times, idle = [], []
    for s in range(steps - 1):  # the last step has no next start to measure to
        chunk, nxt = chunks[s], chunks[s + 1][0]
        step_times.append(nxt[1] - chunk[0][1])
        idle.append(max(0.0, nxt[1] - max(e[2] for e in chunk)))
        per_label: dict[str, float] = {}
        for k, (label, e) in enumerate(zip(labels, chunk, strict=True)):
            following = chunk[k + 1][1] if k + 1 < n else nxt[1]
            per_label[label] = per_label.get(label, 0.0) + (following - e[1])
            durations.setdefault(label, []).append(e[2] - e[1])
        for label, t in per_label.items():
            shares.setdefault(label, []).append(t)
    rows = [Row(label, labels.count(label), statistics.median(durations[label]), statistics.median(shares[label]))
            for label in dict.fromkeys(labels)]
    rows.sort(key=lambda r: -r.share_us)
    return rows, statistics.median(step_times), statistics.median(idle)


def _replays(graph: torch.cuda.CUDAGraph, replays: int) -> tuple[float, list[tuple[str, float, float]]]:
    """µs a replay of ``graph`` takes back to back (median of 5 runs), and the kernels of
    ``replays`` replays."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    for _ in range(3):
        graph.replay()
    seconds = replay_time(graph, replays)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return seconds * 1e6, [(e.name, e.time_range.start, e.time_range.end)
                           for e in prof.events() if e.device_type == DeviceType.CUDA]


def _decode_graph(llm: LLM, batch: int, vocab: int) -> torch.cuda.CUDAGraph:
    """The decode graph for ``batch``, left planned for the last step of a greedy generate at
    that batch (the same pages, so the same work; a replay rewrites the KV of the step's slots,
    so the caller clears the cache after)."""
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, vocab, (128,), generator=gen).tolist() for _ in range(batch)]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    runner = llm.engine.runner
    return runner.graphs[next(b for b in sorted(runner.graphs) if b >= batch)][0]


def _prefill_graph(llm: LLM, n: int, vocab: int) -> tuple[torch.cuda.CUDAGraph, float]:
    """The prefill graph a fresh ``n``-token prompt replays, left planned for it (a replay
    recomputes the same KV into the same slots), and the median ms of ``generate`` on it."""
    from braid_engine.engine.model_runner import prefill_pieces

    runner = llm.engine.runner
    if prefill_pieces(n, runner.prefill_sizes) != [n] or n not in runner.prefill_sizes:
        raise SystemExit(f"--prefill {n}: give a prefill graph's size ({', '.join(map(str, runner.prefill_sizes))})")
    ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    dev = llm.config.device
    times = []
    for _ in range(6):
        t0 = now(dev)
        llm.generate([ids], one)
        times.append(now(dev) - t0)
    graphs = runner.fresh_prefill_graphs if n in runner.fresh_prefill_graphs else runner.prefill_graphs
    return graphs[n][0], statistics.median(times[1:]) * 1e3


def _launch_cost(graph: torch.cuda.CUDAGraph, reps: int = 20) -> tuple[float, float]:
    """A replay launched on an idle GPU: (µs the host spends in ``replay()``, µs from an event
    queued just before it to one just after it). Less the graph's back-to-back time, the second is
    how long the GPU waited for the launch before its first kernel."""
    host, span = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t = time.perf_counter()
        graph.replay()
        host.append(time.perf_counter() - t)
        b.record()
        torch.cuda.synchronize()
        span.append(a.elapsed_time(b) * 1e3)
    return statistics.median(host) * 1e6, statistics.median(span)


def _print_launch(graph: torch.cuda.CUDAGraph, us: float) -> None:
    """``_launch_cost`` of a graph whose replays back to back take ``us``, printed."""
    host, span = _launch_cost(graph)
    print(f"  launched on an idle GPU: {host:.1f} µs in replay() on the host; GPU span {span:.1f} µs "
          f"(waiting {span - us:.1f} µs for the launch)")


class _Parts:
    """Graphs replayed one after another, as one."""

    def __init__(self, graphs: list[torch.cuda.CUDAGraph]) -> None:
        self.graphs = graphs

    def replay(self) -> None:
        for g in self.graphs:
            g.replay()


def _launch_scaling(kernels: tuple[int, ...] = (32, 128, 512), parts: int = 4) -> None:
    """Graphs of N tiny kernels: the host's launch and the GPU's wait for it as N grows, and the
    same N kernels as ``parts`` graphs launched one after another (the GPU may start on the first
    while the host launches the rest)."""
    x = torch.zeros(256, device="cuda")

    def captured(n: int) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                x.add_(1)
        return g

    for n in kernels:
        whole, pieces = captured(n), [captured(n // parts) for _ in range(parts)]
        host, span = _launch_cost(whole)
        b2b = replay_time(whole, 20) * 1e6

        host_p, span_p = _launch_cost(_Parts(pieces))  # type: ignore[arg-type]
        print(f"  {n:>4} kernels: back to back {b2b:7.1f} µs; one graph launch {host:6.1f} µs on the host, "
              f"GPU span {span:7.1f} µs (wait {span - b2b:6.1f}); as {parts} graphs {host_p:6.1f} µs on the host, "
              f"GPU span {span_p:7.1f} µs")


def _host_profile(llm: LLM, n: int, vocab: int, top: int) -> None:
    """A fresh ``n``-token prompt stepped in this thread under cProfile: the step's wall time
    (against generate's, the rest is the hand-off between threads) and the functions that take it."""
    import cProfile
    import pstats

    eng, dev = llm.engine, llm.config.device
    ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prof = cProfile.Profile()
    walls = []
    for r in range(4):
        with eng.together():  # the loop thread takes no request while this lock is held
            stream = eng.add_request(ids, one, final_only=True)
            pending, eng._pending = eng._pending, []
            with eng._state:
                for seq in pending:
                    eng._seqs[seq.request_id] = seq
                    eng.scheduler.add(seq)
                t0 = now(dev)
                if r == 3:
                    prof.enable()
                while eng.scheduler.has_work():
                    eng.step()
                if r == 3:
                    prof.disable()
                walls.append(now(dev) - t0)
        stream.result()
    # the same prompt through generate, the caller's add_requests and the loop thread's steps
    # timed from inside them (the rest is the hand-offs between the threads and the output)
    spans: dict[str, list[float]] = {"step": [], "add_requests": []}

    def timed(name: str):
        inner = getattr(eng, name)

        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spans[name].append(time.perf_counter() - t)
        return call

    eng.step, eng.add_requests = timed("step"), timed("add_requests")
    totals = []
    try:
        for _ in range(4):
            for v in spans.values():
                v.clear()
            t0 = now(dev)
            llm.generate([ids], one)
            elapsed = now(dev) - t0
            with eng._state:  # the step that emitted the output has returned (it holds this lock)
                totals.append((elapsed, sum(spans["step"]), sum(spans["add_requests"])))
    finally:
        del eng.step, eng.add_requests
    gen, in_steps, adding = (statistics.median(t[k] for t in totals[1:]) for k in range(3))
    table = pstats.Stats(prof).stats  # (file, line, name) -> (calls, ncalls, own s, cumulative s, callers)
    print(f"\nfresh {n}-token prompt stepped in this thread: {statistics.median(walls[1:]) * 1e3:.2f} ms "
          f"(runs {', '.join(f'{w * 1e3:.2f}' for w in walls[1:])}); through generate {gen * 1e3:.2f} ms, of which "
          f"add_requests {adding * 1e3:.2f} and the loop thread's steps {in_steps * 1e3:.2f}; the in-thread step "
          "under cProfile, µs:")
    for key, order in (("cumulative", 3), ("own", 2)):
        print(f"  by {key} time: {'calls':>6} {'own':>8} {'cumul.':>8}")
        for (file, line, name), st in sorted(table.items(), key=lambda kv: -kv[1][order])[:top]:
            where = f"{file.rsplit('/', 2)[-1] if '/' in file else file}:{line}({name})"
            print(f"    {where[:60]:<60} {st[1]:>6} {st[2] * 1e6:>8.0f} {st[3] * 1e6:>8.0f}")


def _print(events: list[tuple[str, float, float]], replays: int, layers: int, top: int, what: str) -> None:
    try:
        rows, step, idle = analyse(events, replays, layers)
    except ValueError as e:  # e.g. the profiler dropped or added a record
        print(f"  the profile does not split into {replays} replays ({e}); {len(events)} kernels recorded")
        return
    per_step = sum(r.per_step for r in rows)
    print(f"  profiled: {per_step} kernels {what}; {step:.1f} µs from one's first kernel to the next's, "
          f"GPU idle between replays {idle:.1f} µs")
    print(f"  {'kernel':<52} {'count':>6} {'own µs':>8} {'share µs':>9} {'of it':>7}")
    for r in rows[:top]:
        print(f"  {r.label[:52]:<52} {r.per_step:>6} {r.duration_us:>8.2f} {r.share_us:>9.1f} {r.share_us / step:>7.1%}")


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--batch", type=int, nargs="*", default=[1])
    ap.add_argument("--prefill", type=int, nargs="*", default=[], help="fresh prompt lengths (prefill graph sizes)")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--host-profile", type=int, nargs="*", default=[], metavar="N",
                    help="fresh N-token prompts stepped in this thread under cProfile")
    ap.add_argument("--launch", action="store_true",
                    help="also each graph launched on an idle GPU: the host's launch and the GPU's wait for it, "
                         "and graphs of N tiny kernels whole and in parts")
    args = ap.parse_args()
    path = build_model(args.shape, args.model)
    llm = LLM(path, device=args.device, dtype=args.dtype, pipeline_bursts=False, enable_prefix_caching=False,
              **(kv_kwargs(args) or {"kv_cache_memory": 4 << 30}))
    dev = llm.config.device
    if dev.type != "cuda" or not llm.engine.runner.graphs:
        if args.host_profile and not args.batch and not args.prefill:  # the host profile runs anywhere
            for n in args.host_profile:
                _host_profile(llm, n, len(llm.tokenizer), 2 * args.top)
            return
        raise SystemExit("graph_timeline needs CUDA graphs (a CUDA device)")
    layers, vocab = llm.model_config.num_hidden_layers, len(llm.tokenizer)
    print(f"card: {card(dev)}; dtype {llm.config.dtype}; {layers} layers; graphs replayed back to back")
    for batch in args.batch:
        us, events = _replays(_decode_graph(llm, batch, vocab), args.replays)
        llm.engine.clear_cache()
        print(f"\nbatch {batch} decode: a replay takes {us:.1f} µs without the profiler ({1e6 / us * batch:,.0f} tokens/s)")
        if args.launch:
            graph = _decode_graph(llm, batch, vocab)
            llm.engine.clear_cache()
            _print_launch(graph, us)
        _print(events, args.replays, layers, args.top, "a step")
    for n in args.prefill:
        graph, ms = _prefill_graph(llm, n, vocab)
        us, events = _replays(graph, max(3, args.replays // 10))
        print(f"\nfresh {n}-token prompt: generate {ms:.2f} ms; its graph alone {us / 1e3:.2f} ms; "
              f"outside the graph {ms - us / 1e3:.2f} ms")
        if args.launch:
            _print_launch(graph, us)
        _print(events, max(3, args.replays // 10), layers, args.top, "a prompt")
    for n in args.host_profile:
        _host_profile(llm, n, vocab, 2 * args.top)
    if args.launch:
        print("\ngraphs of tiny kernels (x.add_(1)), launched on an idle GPU:")
        _launch_scaling()
    llm.shutdown()


if __name__ == "__main__":
    main()
