"""Prefill time (time to the first token of a fresh prompt) for long prompts: the engine vs
transformers eager and transformers under `torch.compile`, same weights, same card, one run.

    python -m benchmarks.prefill --shape qwen3-0.6b --device cuda --dtype bfloat16 --tokens 1024 4096 16384
    python -m benchmarks.prefill ... --prefill-graph-tokens 256   # prompts past 256 tokens eagerly
    python -m benchmarks.prefill ... --fa3-graph-rows 512         # graphs of 512+ rows on fa3, not fa2
    python -m benchmarks.prefill ... --paged-fresh                 # fresh prompts read their keys from the pages
    python -m benchmarks.prefill ... --compare-fresh               # both ways, alternating in one process
    python -m benchmarks.prefill ... --compare-switch PDL_RMS_NORM # a kernels switch each way, alternating
    python -m benchmarks.prefill --tokens 256 1024 --compiled-tokens      # tiny model, CPU smoke run
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import (
    alternate,
    build_model,
    card,
    copy_bandwidth,
    forward_flops,
    kv_kwargs,
    model_arguments,
    now,
    weight_and_kv_bytes,
)
from braid_engine import LLM, SamplingParams


def median_seconds(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = now(device)
        fn()
        times.append(now(device) - t0)
    return statistics.median(times)


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compiled-tokens", type=int, nargs="*", default=[1024, 4096],
                    help="prompt lengths for the torch.compile baseline (each length compiles anew)")
    ap.add_argument("--prefill-graph-tokens", type=int, default=8192,
                    help="largest prefill CUDA graph (LLM(prefill_graph_tokens=...)); longer prompts run eagerly")
    ap.add_argument("--fa3-graph-rows", type=int, default=None,
                    help="prefill graphs of at least this many rows on FlashInfer's default backend (fa3 on "
                         "Hopper) instead of fa2 (FlashInferBackend.fa3_prefill_graph_rows, default 512); "
                         "0: every graph on fa2")
    ap.add_argument("--paged-fresh", action="store_true",
                    help="a fresh prompt attends its keys through the paged KV cache, as any other step "
                         "(FlashInferBackend.ragged_fresh_prefill off), not its own k/v")
    ap.add_argument("--compare-fresh", action="store_true",
                    help="time the engine with fresh prompts on their own k/v and paged, alternating "
                         "--repeat times each in this process (no transformers rows)")
    ap.add_argument("--compare-switch", metavar="NAME", default=None,
                    help="time the engine against a second one whose graphs were captured with the boolean "
                         "braid_engine.kernels.NAME the other way, alternating --repeat times each in this "
                         "process (no transformers rows; needs room for two engines)")
    args = ap.parse_args()
    from braid_engine import kernels
    from braid_engine.attention.flashinfer_backend import FlashInferBackend

    switch = args.compare_switch
    if switch is not None and not isinstance(getattr(kernels, switch, None), bool):
        ap.error(f"--compare-switch takes a boolean braid_engine.kernels switch, not {switch!r}")

    if args.fa3_graph_rows is not None:
        FlashInferBackend.fa3_prefill_graph_rows = args.fa3_graph_rows or None
    if args.paged_fresh:
        FlashInferBackend.ragged_fresh_prefill = False
    path = build_model(args.shape, args.model)

    def engine() -> LLM:
        return LLM(path, device=args.device, dtype=args.dtype, enable_prefix_caching=False,
                   prefill_graph_tokens=args.prefill_graph_tokens, **kv_kwargs(args))

    t0 = time.perf_counter()
    llm = engine()
    start_s = time.perf_counter() - t0
    graph_mb = torch.cuda.memory_allocated() / 1e6 if llm.config.device.type == "cuda" else 0.0
    device, dtype = llm.config.device, llm.config.dtype
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    compiled = torch.compile(hf)
    gen = torch.Generator().manual_seed(0)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    if args.compare_fresh:
        compare_fresh(llm, args.tokens, args.repeat, gen, one)
        llm.shutdown()
        return
    if switch is not None:
        value = getattr(kernels, switch)
        setattr(kernels, switch, not value)  # read as the other engine captures its graphs
        try:
            other = engine()
        finally:
            setattr(kernels, switch, value)
        names = (f"{switch} on", f"{switch} off") if value else (f"{switch} off", f"{switch} on")
        print(f"card: {card(device)}; dtype {dtype}; the engine ({names[0]}) against one whose graphs were "
              f"captured with {names[1]}, alternating, {args.repeat} runs each")
        compare_ways(dict(zip(names, (lambda: llm, lambda: other))), args.tokens, args.repeat, gen, one, device)
        llm.shutdown()
        other.shutdown()
        return
    weights, kv_per_token = weight_and_kv_bytes(hf)
    bw = copy_bandwidth(device)
    print(f"card: {card(device)}; dtype {dtype}; attention {llm.config.attention_backend}; "
          f"prefill graphs up to {args.prefill_graph_tokens} rows"
          f"{f' (fa3 from {args.fa3_graph_rows} rows)' if args.fa3_graph_rows else ''}; fresh prompts "
          f"{'paged' if args.paged_fresh else 'on their own k/v'}; copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"engine start {start_s:.1f} s, {graph_mb:.0f} MB allocated after it")
    print(f"{'tokens':>7} {'braid ms':>9} {'hf eager ms':>12} {'hf compiled ms':>15} {'vs eager':>9} {'vs compiled':>12}"
          f" {'braid TFLOP/s':>14} {'bandwidth':>10}")
    for n in args.tokens:
        if n >= llm.config.max_model_len:
            print(f"{n:>7} skipped: max_model_len is {llm.config.max_model_len}")
            continue
        ids = torch.randint(3, len(llm.tokenizer), (n,), generator=gen).tolist()
        x = torch.tensor([ids], device=device)
        t_braid = median_seconds(lambda ids=ids: llm.generate([ids], one), device, args.repeat)
        with torch.inference_mode():
            # both baselines compute the last position's logits only, as the engine does
            t_hf = median_seconds(lambda x=x: hf(x, use_cache=False, logits_to_keep=1).logits[0, -1].argmax().item(),
                                  device, args.repeat)
            t_comp = (median_seconds(
                lambda x=x: compiled(x, use_cache=False, logits_to_keep=1).logits[0, -1].argmax().item(),
                device, args.repeat) if n in args.compiled_tokens else None)
        comp = f"{t_comp * 1e3:>15.2f}" if t_comp else f"{'-':>15}"
        vs_comp = f"{t_comp / t_braid:>11.2f}x" if t_comp else f"{'-':>12}"
        # bandwidth: the weights read once and the prompt's KV written, over the time, against the copy
        frac = (weights + n * kv_per_token) / t_braid / bw
        print(f"{n:>7} {t_braid * 1e3:>9.2f} {t_hf * 1e3:>12.2f} {comp} {t_hf / t_braid:>8.2f}x {vs_comp}"
              f" {forward_flops(hf, n) / t_braid / 1e12:>14.1f} {frac:>9.0%}")
    llm.shutdown()


def compare_fresh(llm: LLM, lengths: list[int], repeat: int, gen: torch.Generator, one: SamplingParams) -> None:
    """Each prompt length timed with fresh prompts attending their own k/v (the default) and
    through the pages, alternating, in one process; the first token must agree."""
    runner = llm.engine.runner
    backend, twins = runner.backend, runner.fresh_prefill_graphs
    device = llm.config.device

    def fresh(on: bool) -> None:  # the eager plan asks the backend; the graphs' twins are the runner's
        backend.ragged_fresh_prefill = on
        runner.fresh_prefill_graphs = twins if on else {}

    print(f"card: {card(device)}; dtype {llm.config.dtype}; fresh prompts on their own k/v vs paged, "
          f"alternating, {repeat} runs each (twin graphs: {sorted(twins)})")
    try:
        compare_ways({"own k/v": lambda: fresh(True) or llm, "paged": lambda: fresh(False) or llm},
                     lengths, repeat, gen, one, device)
    finally:
        fresh(True)


def compare_ways(ways: dict, lengths: list[int], repeat: int, gen: torch.Generator, one: SamplingParams,
                 device: torch.device) -> None:
    """Each prompt length's first token timed two ways (each a function that sets its way up and
    returns the engine to use), alternating after a warm round; their first tokens must agree."""
    (a, way_a), (b, _) = ways.items()
    for n in lengths:
        ids = torch.randint(3, len(way_a().tokenizer), (n,), generator=gen).tolist()

        def measure(llm: LLM, ids=ids) -> tuple[float, int]:
            t0 = now(device)
            out = llm.generate([ids], one)[0]
            return now(device) - t0, out.token_ids[0]

        med, times, same = alternate(ways, measure, repeat, warm=True)
        print(f"{n:>7} tokens: {a} {med[a] * 1e3:.2f} ms vs {b} {med[b] * 1e3:.2f} ms ({med[b] / med[a]:.3f}x; runs "
              f"{', '.join(f'{t * 1e3:.2f}' for t in times[a])} vs {', '.join(f'{t * 1e3:.2f}' for t in times[b])})"
              f"; first token {'the same' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
