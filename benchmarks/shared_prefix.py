"""Many requests sharing one long system prompt: throughput and KV memory, cascade on / off,
against transformers — eager `generate`, and a `StaticCache` with the decode step under
`torch.compile` — both of which store the prefix once per request. "Bandwidth": the bytes the
decode steps must read at the least (the weights and every request's KV, the shared prefix
once, each step) over the whole run's time, against the measured copy bandwidth.

    python -m benchmarks.shared_prefix --shape qwen3-0.6b --device cuda --dtype bfloat16
    python -m benchmarks.shared_prefix ... --cascade-graphs 32 --skip-transformers   # cascades kept in graphs
    python -m benchmarks.shared_prefix --requests 8 --prefix-tokens 256 --new-tokens 16   # CPU smoke run
"""

from __future__ import annotations

import gc

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import build_model, card, copy_bandwidth, kv_kwargs, model_arguments, now
from benchmarks.decode import hf_compiled
from braid_engine import LLM, SamplingParams
from braid_engine.engine.kv_cache import kv_bytes_per_token


def _free_memory(device: torch.device) -> None:
    """Return what the last run left to the allocator, so the next baseline has the card."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=4096)
    ap.add_argument("--suffix-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cascade-graphs", type=int, default=None, metavar="BATCH",
                    help="decode graphs of at least BATCH get a cascade twin "
                         "(FlashInferBackend.cascade_graph_batch, default 32): cascaded steps keep their "
                         "graph; 0: no twins (a cascaded step runs eagerly)")
    ap.add_argument("--skip-transformers", action="store_true", help="the engine's rows only")
    args = ap.parse_args()
    if args.cascade_graphs is not None:
        from braid_engine.attention.flashinfer_backend import FlashInferBackend

        FlashInferBackend.cascade_graph_batch = args.cascade_graphs or None
    path = build_model(args.shape, args.model)
    gen = torch.Generator().manual_seed(0)
    rows = []
    hf_dtype = None
    header = False
    floor_bytes = bw = 0.0

    def row(name: str, tps: float, sec: float, kv: float, steps: int) -> None:
        """Print each result as it comes, so a run cut short still reports what it measured."""
        nonlocal header, floor_bytes, bw
        if not header:
            bw = copy_bandwidth(device)
            own = args.suffix_tokens + args.new_tokens / 2
            floor_bytes = args.new_tokens * (weights + (args.prefix_tokens + args.requests * own) * per_token)
            print(f"card: {card(device)}; dtype {hf_dtype}; {args.requests} requests × ({args.prefix_tokens} "
                  f"shared + {args.suffix_tokens} own) tokens, {args.new_tokens} new each; copy bandwidth "
                  f"{bw / 1e12:.2f} TB/s")
            print(f"{'':<34} {'tokens/s':>10} {'seconds':>8} {'KV MB':>8} {'cascade steps':>14} {'bandwidth':>10}",
                  flush=True)
            header = True
        rows.append((name, tps, sec, kv, steps))
        print(f"{name:<34} {tps:>10.1f} {sec:>8.2f} {kv / 1e6:>8.1f} {steps:>14} {floor_bytes / sec / bw:>9.0%}",
              flush=True)

    for cascade in ("auto", "never", "always"):
        llm = LLM(path, device=args.device, dtype=args.dtype, cascade=cascade, **kv_kwargs(args))
        device, hf_dtype = llm.config.device, llm.config.dtype
        vocab = len(llm.tokenizer)
        gen.manual_seed(0)
        prefix = torch.randint(3, vocab, (args.prefix_tokens,), generator=gen).tolist()
        prompts = [prefix + torch.randint(3, vocab, (args.suffix_tokens,), generator=gen).tolist()
                   for _ in range(args.requests)]
        params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
        # warm-up at the timed run's shape: kernels that a two-request warm-up never reached
        # (FlashInfer builds the cascade's on first use) cost the first row 14 s on an H100
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        llm.engine.clear_cache()
        llm.engine.runner.backend.cascade_steps = 0
        t0 = now(device)
        outs = llm.generate(prompts, params)
        seconds = now(device) - t0
        s = llm.stats()
        page_bytes = llm.engine.runner.backend.kv_cache[:, 0].numel() * llm.config.dtype.itemsize
        weights = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
        per_token = kv_bytes_per_token(llm.model_config, llm.config.dtype)
        twins = f", twins from {args.cascade_graphs}" if args.cascade_graphs is not None else ""
        row(f"braid, cascade {cascade}{twins}", sum(len(o.token_ids) for o in outs) / seconds, seconds,
            s["pages_peak"] * page_bytes, s["cascade_steps"])
        llm.shutdown()
        del llm
        _free_memory(device)
    if args.skip_transformers:
        return
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=hf_dtype).to(device).eval()
    x = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        hf.generate(x[:2], max_new_tokens=2, do_sample=False, pad_token_id=0)
        t0 = now(device)
        out = hf.generate(x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
        seconds = now(device) - t0
    cfg = hf.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.head_dim or 0) * hf_dtype.itemsize
    hf_kv = args.requests * (args.prefix_tokens + args.suffix_tokens + args.new_tokens) * per_token
    row("transformers eager", (out.shape[1] - x.shape[1]) * args.requests / seconds, seconds, hf_kv, 0)
    del out
    _free_memory(device)
    prefill_s, decode_s = hf_compiled(hf, x, args.new_tokens, device)
    seconds = prefill_s + decode_s
    row("transformers compiled", args.new_tokens * args.requests / seconds, seconds, hf_kv, 0)
    print(f"braid (auto) vs transformers eager: {rows[0][1] / rows[-2][1]:.2f}x tokens/s; vs compiled: "
          f"{rows[0][1] / rows[-1][1]:.2f}x tokens/s; {rows[-1][3] / rows[0][3]:.1f}x less KV")


if __name__ == "__main__":
    main()
