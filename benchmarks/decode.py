"""Decode throughput (tokens/s) by batch size: the engine vs two transformers baselines.

Baselines, same weights, same card, same run: transformers `generate` (eager), and a
hand-written decode loop over `StaticCache` with the step under
`torch.compile(mode="reduce-overhead", fullgraph=True)` (what a PyTorch user would write).
Each row also gives the bytes a decode step must read (weights + KV) over its time, as a
fraction of the card's measured copy bandwidth. Greedy unless `--temperature` is above 0: then
all three sample with the same filters (the engine's requests seeded by their place in the batch).

    python -m benchmarks.decode --shape qwen3-0.6b --device cuda --batch 1 8 32 128
    python -m benchmarks.decode --shape qwen3-0.6b --device cuda --batch 1 8 32 --temperature 0.7 --top-p 0.95 --top-k 20
    python -m benchmarks.decode --batch 1 4 --new-tokens 16          # tiny model, CPU smoke run
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, StaticCache

from benchmarks.common import (
    add_pipeline_argument,
    alternate,
    build_model,
    card,
    copy_bandwidth,
    kv_kwargs,
    model_arguments,
    now,
    pipeline_setting,
    weight_and_kv_bytes,
)
from braid_engine import LLM, InvalidSamplingParamsError, SamplingParams, kernels
from braid_engine import sampling as braid_sampling
from braid_engine.attention.flashinfer_backend import FlashInferBackend

# whether the timed sampled requests are seeded (--unseeded: not, as ChatBraid's are by default;
# the token comparisons between engines stay seeded)
TIMED_SEEDS = True


def engine_generate(llm: LLM, prompts: list[list[int]], new: int, sampling: SamplingParams,
                    seeded: bool = True) -> list[list[int]]:
    """Each prompt's `new` tokens, in one batch; sampled and ``seeded``, request i is seeded i, so
    two engines given the same logits draw the same tokens."""
    seeded = seeded and not sampling.greedy
    params = [replace(sampling, max_tokens=new, seed=i if seeded else None) for i in range(len(prompts))]
    return [o.token_ids for o in llm.generate(prompts, params)]


def engine_decode(llm: LLM, prompts: list[list[int]], new: int, device: torch.device,
                  sampling: SamplingParams) -> float:
    """Seconds for `new - 1` decode steps of the whole batch (prefill time subtracted)."""
    engine_generate(llm, prompts, new, sampling, TIMED_SEEDS)  # warm-up (graphs, kernels)
    t0 = now(device)
    engine_generate(llm, prompts, 1, sampling, TIMED_SEEDS)
    t1 = now(device)
    engine_generate(llm, prompts, new, sampling, TIMED_SEEDS)
    t2 = now(device)
    return (t2 - t1) - (t1 - t0)


def hf_sampling(sampling: SamplingParams) -> dict:
    """transformers ``generate``'s arguments for these settings: top_k 0 where it is off (left
    out, it would be 50), min_p None (0 would still filter every step)."""
    if sampling.greedy:
        return dict(do_sample=False)
    return dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=max(sampling.top_k, 0), min_p=sampling.min_p or None)


def draw(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Next tokens [B, 1] from last-position logits [B, V]: the argmax, or a draw after
    temperature, top-k, top-p and min-p (transformers' order), all in sorted order so that it
    compiles into one graph (no data-dependent shapes). With top-k, only the k largest are kept
    and sorted (``torch.topk``), as a user of torch would write it; without, the whole row (torch
    2.11's inductor then fails to compile the draw's argmax over the vocabulary: "NYI
    TritonSplitDimKernel reductions")."""
    if sampling.greedy:
        return logits.argmax(-1, keepdim=True)
    scaled = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        logits, order = torch.topk(scaled, min(sampling.top_k, scaled.shape[-1]))
    else:
        logits, order = scaled.sort(-1, descending=True)
    probs = logits.softmax(-1)
    if sampling.top_p < 1:  # the smallest prefix whose mass reaches top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= sampling.top_p, 0)
    if sampling.min_p > 0:
        probs = probs.masked_fill(probs < sampling.min_p * probs[:, :1], 0)
    # exponential race: argmax p / E, E ~ Exp(1), draws in proportion to p (unnormalised)
    return order.gather(-1, (probs / torch.empty_like(probs).exponential_()).argmax(-1, keepdim=True))


@torch.inference_mode()
def hf_eager(model, prompts: torch.Tensor, new: int, device: torch.device, sampling: SamplingParams) -> float:
    kw = dict(**hf_sampling(sampling), pad_token_id=0, eos_token_id=None)
    model.generate(prompts, max_new_tokens=2, min_new_tokens=2, **kw)
    t0 = now(device)
    model.generate(prompts, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = now(device)
    model.generate(prompts, max_new_tokens=new, min_new_tokens=new, **kw)
    t2 = now(device)
    return (t2 - t1) - (t1 - t0)


@torch.inference_mode()
def hf_compiled(model, prompts: torch.Tensor, new: int, device: torch.device,
                sampling: SamplingParams) -> tuple[float, float]:
    """transformers with a ``StaticCache`` and the decode step under ``torch.compile``: seconds
    of the prefill and of the ``new - 1`` decode steps (third run; the first compiles)."""
    b, p = prompts.shape
    cache = StaticCache(config=model.config, max_cache_len=p + new + 1)

    def step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = model(tok, past_key_values=cache, cache_position=pos, use_cache=True)
        return draw(out.logits[:, -1], sampling)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def run() -> tuple[float, float]:
        cache.reset()
        t0 = now(device)
        logits = model(prompts, past_key_values=cache, cache_position=torch.arange(p, device=device),
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        tok = draw(logits, sampling)
        t1 = now(device)
        for i in range(new - 1):
            tok = compiled(tok.clone(), torch.tensor([p + i], device=device))
        return t1 - t0, now(device) - t1

    run()  # compiles
    run()
    return run()


# --compare-FLAG: an engine whose graphs were captured with this boolean braid_engine.kernels switch
# flipped, and what the output calls the engine with it on and off
_FLIPPED = {
    "silu-out": ("ROW_SILU_OUT", "SiLU·mul written by gate_up", "SiLU·mul in down_proj"),
    "fused-greedy": ("FUSED_GREEDY", "greedy tokens by our kernel", "greedy tokens by torch"),
    "fold-embedding": ("FOLD_EMBEDDING", "embeddings gathered by qkv", "an embedding kernel"),
    "pdl-rms-norm": ("PDL_RMS_NORM", "RMSNorm a dependent launch", "RMSNorm launched plainly"),
    "fused-sampling": ("FUSED_SAMPLING", "sampled tokens by our kernel", "sampled tokens by torch"),
    "fused-top-k": ("FUSED_TOP_K", "top-k threshold by our kernels", "top-k threshold by torch.topk"),
    "fused-top-p": ("FUSED_TOP_P", "top-p keep rule by our kernels", "top-p by torch"),
}


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--compiled-batches", type=int, nargs="*", default=[1],
                    help="batch sizes for the torch.compile baseline (each compiles anew)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="with --temperature > 0; 1: off")
    ap.add_argument("--top-k", type=int, default=-1, help="with --temperature > 0; ≤ 0: off")
    ap.add_argument("--min-p", type=float, default=0.0, help="with --temperature > 0; 0: off")
    ap.add_argument("--top-p-cut", choices=("sorted", "sort-free"), default=None,
                    help="top-p after top-k with each row sorted or cut among the top-k values "
                         "(braid_engine.sampling.SORT_FREE_TOP_P off or on; default: the engine's, sorted on a GPU)")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--no-row-kernels", action="store_true",
                    help="one-token steps use cuBLAS and the standalone norm/SiLU kernels (to measure the row kernels)")
    ap.add_argument("--no-small-decode", action="store_true",
                    help="decode steps of ≤ 4 sequences use FlashInfer's decode, not our split-KV kernel")
    ap.add_argument("--decode-burst", type=int, default=None,
                    help="greedy steps between token reads (LLM(decode_burst=...); engine default 8, cut at page ends)")
    add_pipeline_argument(ap)
    ap.add_argument("--compare-pipelining", action="store_true",
                    help="after each row, the engine with bursts pipelined and not, in turn, in this process "
                         "(tokens/s of each, and whether their greedy tokens are the same)")
    ap.add_argument("--compare-read-ahead", action="store_true",
                    help="after each row, the engine against a second one whose graphs were captured with "
                         "braid_engine.kernels.READ_AHEAD off, in turn, in this process (needs room for two KV pools)")
    ap.add_argument("--compare-split-config", type=_split_config, default=None, metavar="S/T/W/P",
                    help="after each row, the engine against a second one whose split-KV decode attention has these "
                         "settings (braid_engine.kernels.SPLIT_KV_CONFIG: most splits, key tile, warps, stages), in "
                         "turn, in this process (needs room for two KV pools)")
    ap.add_argument("--compare-row-rows", type=int, default=None, metavar="N",
                    help="after each row, the engine against a second one whose steps of up to N rows take the row "
                         "kernels (braid_engine.kernels.ROW_KERNEL_ROWS; 1: batch 1 alone), in turn, in this process")
    ap.add_argument("--compare-small-decode-batch", type=int, default=None, metavar="N",
                    help="after each row, the engine against a second one whose decode steps of up to N sequences "
                         "take our split-KV attention kernel (FlashInferBackend.small_decode_batch), in turn")
    for flag, (switch, *_) in _FLIPPED.items():
        ap.add_argument(f"--compare-{flag}", action="store_true",
                        help="after each row, the engine against a second one whose graphs were captured with "
                             f"braid_engine.kernels.{switch} the other way, in turn, in this process")
    ap.add_argument("--unseeded", action="store_true",
                    help="sampled: the timed requests have no seed, as ChatBraid's have none by default (they draw "
                         "from the default generator); "
                         "the token comparisons between engines stay seeded")
    ap.add_argument("--compare-draw-graphs", action="store_true",
                    help="after each row, the engine against a second one whose sampled bursts draw their tokens "
                         "op by op, not in a graph of their own (ModelRunner.draw_graph_rows 0), in turn")
    ap.add_argument("--skip-transformers", action="store_true",
                    help="the engine's tokens/s only (to set two builds of the engine side by side; a record "
                         "needs the baselines)")
    args = ap.parse_args()
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  min_p=args.min_p, ignore_eos=True, enable_prefix_caching=False)
    except InvalidSamplingParamsError as e:
        ap.error(str(e))
    if args.compare_row_rows is not None and not 1 <= args.compare_row_rows <= kernels.ROW_KERNEL_MAX_ROWS:
        ap.error(f"--compare-row-rows takes 1 to {kernels.ROW_KERNEL_MAX_ROWS} (the most rows a row-kernel launch takes)")
    global TIMED_SEEDS
    TIMED_SEEDS = not args.unseeded
    if args.top_p_cut is not None:
        braid_sampling.SORT_FREE_TOP_P = args.top_p_cut == "sort-free"
    if args.no_row_kernels:
        from braid_engine.models.layers import DecoderLayer

        DecoderLayer.row_kernels = False
    if args.no_small_decode:
        FlashInferBackend.small_decode_batch = 0
    kv = kv_kwargs(args)

    path = build_model(args.shape, args.model)
    burst = {} if args.decode_burst is None else {"decode_burst": args.decode_burst}

    def engine_with(small_decode_batch: int | None = None, **switches) -> LLM:
        """An engine whose graphs were captured with these braid_engine.kernels switches (its
        eager steps read the switches as they are when they run); none: the switches as set.
        ``small_decode_batch``: its FlashInfer backend's bound for our decode attention kernel."""
        before = {name: getattr(kernels, name) for name in switches}
        small_before = FlashInferBackend.small_decode_batch
        for name, value in switches.items():
            setattr(kernels, name, value)
        if small_decode_batch is not None:
            FlashInferBackend.small_decode_batch = small_decode_batch
        try:
            llm = LLM(path, device=args.device, dtype=args.dtype, **kv, attention_backend=args.attention_backend,
                      enable_prefix_caching=False, pipeline_bursts=pipeline_setting(args), **burst)
            if small_decode_batch is not None:  # its eager steps too
                llm.engine.runner.backend.small_decode_batch = small_decode_batch
            return llm
        finally:
            for name, value in before.items():
                setattr(kernels, name, value)
            FlashInferBackend.small_decode_batch = small_before

    llm = engine_with()
    others = []  # (this engine's name, the other's, the other engine)
    if args.compare_read_ahead:
        others.append(("reading ahead", "waiting first", engine_with(READ_AHEAD=False)))
    if args.compare_split_config:
        name = "split-KV {}/{}/{}/{}".format
        others.append((name(*kernels.SPLIT_KV_CONFIG), name(*args.compare_split_config),
                       engine_with(SPLIT_KV_CONFIG=args.compare_split_config)))
    if args.compare_row_rows is not None:
        others.append((f"row kernels ≤ {kernels.ROW_KERNEL_ROWS} rows", f"≤ {args.compare_row_rows}",
                       engine_with(ROW_KERNEL_ROWS=args.compare_row_rows)))
    if args.compare_small_decode_batch is not None:
        others.append((f"our decode attention ≤ {FlashInferBackend.small_decode_batch}",
                       f"≤ {args.compare_small_decode_batch}", engine_with(args.compare_small_decode_batch)))

    if args.compare_draw_graphs:
        op_by_op = engine_with()
        op_by_op.engine.runner.draw_graph_rows = 0
        others.append((f"draws in graphs up to {llm.engine.runner.draw_graph_rows} rows", "draws op by op", op_by_op))

    def flipped(switch: str, on: str, off: str) -> tuple[str, str, LLM]:
        """(this engine's name, the other's, an engine with the boolean kernels switch the other way)."""
        value = getattr(kernels, switch)
        this, other = (on, off) if value else (off, on)
        return this, other, engine_with(**{switch: not value})

    for flag, names in _FLIPPED.items():
        if getattr(args, "compare_" + flag.replace("-", "_")):
            others.append(flipped(*names))
    device, dtype = llm.config.device, llm.config.dtype
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    weight_bytes, kv_per_token = weight_and_kv_bytes(hf)
    bw = copy_bandwidth(device)
    gen = torch.Generator().manual_seed(0)
    print(f"card: {card(device)}; dtype {dtype}; attention {llm.config.attention_backend}; "
          f"row kernels {'off' if args.no_row_kernels else 'on'}; "
          f"small-batch decode kernel {'off' if args.no_small_decode else 'on'}; "
          f"decode bursts of up to {llm.config.decode_burst}{', pipelined' if llm.engine.config.pipeline_bursts else ''}; "
          f"weights {weight_bytes / 1e9:.2f} GB; copy bandwidth {bw / 1e12:.2f} TB/s; {_describe(sampling)}"
          f"{'' if sampling.greedy else ', timed requests seeded' if TIMED_SEEDS else ', timed requests unseeded'}")
    print(f"{'batch':>5} {'braid tok/s':>12} {'hf eager':>10} {'hf compiled':>12} {'vs eager':>9} "
          f"{'vs compiled':>12} {'bandwidth':>10}")
    for b in args.batch:
        ids = torch.randint(3, len(llm.tokenizer), (b, args.prompt_tokens), generator=gen)
        steps = args.new_tokens - 1
        t_braid = engine_decode(llm, ids.tolist(), args.new_tokens, device, sampling)
        t_eager = None if args.skip_transformers else hf_eager(hf, ids.to(device), args.new_tokens, device, sampling)
        t_comp = (hf_compiled(hf, ids.to(device), args.new_tokens, device, sampling)[1]
                  if b in args.compiled_batches and not args.skip_transformers else None)
        tps = b * steps / t_braid
        ctx = args.prompt_tokens + args.new_tokens / 2
        step_bytes = weight_bytes + b * ctx * kv_per_token
        frac = step_bytes / (t_braid / steps) / bw
        comp = f"{b * steps / t_comp:>12.1f}" if t_comp else f"{'-':>12}"
        vs_comp = f"{t_comp / t_braid:>11.2f}x" if t_comp else f"{'-':>12}"
        eager = f"{b * steps / t_eager:>10.1f}" if t_eager else f"{'-':>10}"
        vs_eager = f"{t_eager / t_braid:>8.2f}x" if t_eager else f"{'-':>9}"
        print(f"{b:>5} {tps:>12.1f} {eager} {comp} {vs_eager} {vs_comp} {frac:>9.0%}")
        if args.compare_pipelining:
            compare_pipelining(llm, ids.tolist(), args.new_tokens, device, sampling)
        for name, other_name, other in others:
            compare_engines(llm, other, ids.tolist(), args.new_tokens, device, sampling, name, other_name)
    llm.shutdown()
    for *_, other in others:
        other.shutdown()


def _describe(sampling: SamplingParams) -> str:
    """``greedy``, or ``sampling T=0.7 top_p=0.95 top_k=20`` (the filters that are on)."""
    if sampling.greedy:
        return "greedy"
    filters = {f"top_p={sampling.top_p:g}": sampling.top_p < 1, f"top_k={sampling.top_k}": sampling.top_k > 0,
               f"min_p={sampling.min_p:g}": sampling.min_p > 0}
    return " ".join([f"sampling T={sampling.temperature:g}", *(f for f, on in filters.items() if on)])


def _split_config(text: str) -> tuple[int, int, int, int]:
    """``64/64/4/1`` -> (64, 64, 4, 1): splits, key tile, warps, stages."""
    parts = tuple(int(p) for p in text.split("/"))
    if len(parts) != 4:
        raise ValueError(f"splits/key tile/warps/stages, not {text}")
    return parts


def _decode_rate(prompts: list[list[int]], new: int, device: torch.device, sampling: SamplingParams):
    """``measure`` for ``alternate``: an engine's decode tokens/s and its tokens."""
    def measure(llm: LLM) -> tuple[float, list[list[int]]]:
        rate = len(prompts) * (new - 1) / engine_decode(llm, prompts, new, device, sampling)
        return rate, engine_generate(llm, prompts, new, sampling)
    return measure


def _tokens(sampling: SamplingParams) -> str:
    return "greedy tokens" if sampling.greedy else "seeded sampled tokens"


def _runs(rates: list[float]) -> str:
    return ", ".join(f"{r:.0f}" for r in rates)


def compare_pipelining(llm: LLM, prompts: list[list[int]], new: int, device: torch.device,
                       sampling: SamplingParams) -> None:
    """The engine's decode with bursts pipelined and not, three times each in turn (median
    tokens/s), and whether both give the same tokens."""
    config = llm.engine.config
    was = config.pipeline_bursts

    def mode(on: bool):
        def way() -> LLM:
            config.pipeline_bursts = on
            return llm
        return way

    try:
        med, rates, same = alternate({"plain": mode(False), "piped": mode(True)},
                                     _decode_rate(prompts, new, device, sampling), 3)
    finally:
        config.pipeline_bursts = was
    print(f"      pipelined {med['piped']:.1f} tok/s vs {med['plain']:.1f} ({med['piped'] / med['plain']:.3f}x; runs "
          f"{_runs(rates['piped'])} vs {_runs(rates['plain'])}); {_tokens(sampling)} {'the same' if same else 'DIFFER'}; "
          f"pipelined bursts so far {llm.stats().get('pipelined_bursts', '?')}")


def compare_engines(a: LLM, b: LLM, prompts: list[list[int]], new: int, device: torch.device,
                    sampling: SamplingParams, name_a: str, name_b: str) -> None:
    """Two engines' decode, three times each in turn (median tokens/s), and whether both give
    the same tokens."""
    med, rates, same = alternate({name_b: lambda: b, name_a: lambda: a}, _decode_rate(prompts, new, device, sampling), 3)
    print(f"      {name_a} {med[name_a]:.1f} tok/s vs {name_b} {med[name_b]:.1f} ({med[name_a] / med[name_b]:.3f}x; "
          f"runs {_runs(rates[name_a])} vs {_runs(rates[name_b])}); {_tokens(sampling)} {'the same' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
