"""Streams that are decoding when a long prompt arrives: do they keep their pace?

``--streams`` requests stream greedy tokens; once each has delivered ``--warm-tokens``, a prompt
of ``--long-tokens`` arrives. Reported: the longest wait between two deliveries of any stream
before the long prompt arrived and while it was prefilled (its arrival to its first token), the
streams' tokens/s in both windows, and the long prompt's time to first token against the same
prompt on the idle engine. Deliveries come a decode burst at a time, so the waits before are
bursts, not single steps.

transformers cannot take a request into a running ``generate``: its user runs the long prompt
after the batch, so its first token comes after the batch's remaining steps and its own
prefill — both measured here (eager; the batch's step time from a ``generate`` of the same
streams).

    python -m benchmarks.interleave                                     # tiny model, CPU
    python -m benchmarks.interleave --shape qwen3-0.6b --device cuda --dtype bfloat16 --kv-gb 16
"""

from __future__ import annotations

import statistics
import threading
import time

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import build_model, card, engine_ttft, kv_kwargs, model_arguments, now
from braid_engine import LLM, SamplingParams


def _stream(llm: LLM, prompt: list[int], tokens: int, stamps: list[tuple[float, int]]) -> None:
    """Consume one stream, stamping each delivery with its time and token count."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for out in llm.stream(prompt, params):
        stamps.append((time.perf_counter(), len(out.token_ids)))


def _window(stamps: list[list[tuple[float, int]]], start: float, end: float) -> tuple[float, float]:
    """Longest wait between deliveries ending in [start, end] (a wait that spans ``start``
    counts), and the tokens/s delivered in it, over all streams."""
    longest, tokens = 0.0, 0
    for s in stamps:
        for (t0, _), (t1, n) in zip(s, s[1:], strict=False):
            if start < t1 <= end:
                longest = max(longest, t1 - t0)
                tokens += n
    return longest, tokens / max(end - start, 1e-9)


@torch.inference_mode()
def _hf_times(hf, prompts: list[list[int]], long: list[int], steps: int, device: torch.device) -> tuple[float, float]:
    """transformers eager: seconds a decode step of the batch takes, and the long prompt's prefill."""
    ids = torch.tensor(prompts, device=device)
    hf.generate(ids, do_sample=False, max_new_tokens=2, min_new_tokens=2)  # warm-up
    t0 = now(device)
    hf.generate(ids, do_sample=False, max_new_tokens=steps + 1, min_new_tokens=steps + 1)
    t1 = now(device)
    hf.generate(ids, do_sample=False, max_new_tokens=1, min_new_tokens=1)
    t2 = now(device)
    step = ((t1 - t0) - (t2 - t1)) / steps
    x = torch.tensor([long], device=device)
    hf(x[:, :16])
    t0 = now(device)
    int(hf(x).logits[0, -1].argmax())
    return step, now(device) - t0


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--stream-tokens", type=int, default=256, help="tokens each stream generates")
    ap.add_argument("--warm-tokens", type=int, default=64, help="tokens each stream has before the long prompt")
    ap.add_argument("--long-tokens", type=int, default=None, help="default: 8,192 on CUDA, 1,024 elsewhere")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="the engine's step budget")
    ap.add_argument("--chunk-while-decoding", type=int, default=None,
                    help="LLM(prefill_chunk_while_decoding=...): the prompt's tokens a step while the streams "
                         "decode, in a forward of its own; 0: none (one mixed forward); default: the engine's")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    path = build_model(args.shape, args.model)
    extra = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    if args.chunk_while_decoding is not None:
        extra["prefill_chunk_while_decoding"] = args.chunk_while_decoding or None
    llm = LLM(path, device=args.device, dtype=args.dtype, enable_prefix_caching=False, **kv_kwargs(args), **extra)
    device = llm.config.device
    n_long = args.long_tokens or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator().manual_seed(0)
    vocab = len(llm.tokenizer)
    prompts = torch.randint(3, vocab, (args.streams, args.prompt_tokens), generator=gen).tolist()
    long = torch.randint(3, vocab, (n_long,), generator=gen).tolist()

    # warm-up at the timed shapes (graphs, kernels), then the long prompt alone on the idle engine
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    engine_ttft(llm, long, device)
    idle = statistics.median(engine_ttft(llm, long, device)[0] for _ in range(3))

    stamps: list[list[tuple[float, int]]] = [[] for _ in prompts]
    threads = [threading.Thread(target=_stream, args=(llm, p, args.stream_tokens, s), daemon=True)
               for p, s in zip(prompts, stamps, strict=True)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    while min(sum(n for _, n in s) for s in stamps) < args.warm_tokens:
        time.sleep(0.0005)
    t_arrive = time.perf_counter()
    next(iter(llm.stream(long, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))))
    t_first = time.perf_counter()
    for t in threads:
        t.join()
    if min(sum(n for _, n in s) for s in stamps) < args.stream_tokens:
        raise SystemExit("a stream ended early; see the engine's log")
    if max(s[-1][0] for s in stamps) <= t_first:
        raise SystemExit("the streams finished before the long prompt's first token: raise --stream-tokens")
    gap_before, tps_before = _window(stamps, t_start + (t_arrive - t_start) / 2, t_arrive)
    gap_during, tps_during = _window(stamps, t_arrive, t_first)

    print(f"card: {card(device)}; dtype {llm.config.dtype}; {args.streams} streams of {args.prompt_tokens}-token "
          f"prompts, a {n_long}-token prompt after {args.warm_tokens} tokens each; step budget "
          f"{llm.config.max_num_batched_tokens} tokens; decode bursts of up to {llm.config.decode_burst}; "
          f"prompt chunks while decoding: {llm.config.prefill_chunk_while_decoding or 'the budget, mixed'}")
    print(f"{'':<44}{'longest wait ms':>16}{'streams tok/s':>15}")
    print(f"{'streams before the long prompt':<44}{gap_before * 1e3:>16.2f}{tps_before:>15.1f}")
    print(f"{'streams while it is prefilled':<44}{gap_during * 1e3:>16.2f}{tps_during:>15.1f}")
    busy = t_first - t_arrive
    print(f"long prompt: first token {busy * 1e3:.2f} ms with the streams running, {idle * 1e3:.2f} ms on the "
          f"idle engine ({busy / idle:.2f}x); steps split into separate forwards: {llm.stats()['split_steps']}")
    if not args.skip_transformers:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=llm.config.dtype).to(device).eval()
        remaining = args.stream_tokens - args.warm_tokens
        step, prefill = _hf_times(hf, prompts, long, 16, device)
        wait = remaining * step + prefill
        print(f"transformers eager: a batch step {step * 1e3:.2f} ms, the long prompt's prefill {prefill * 1e3:.2f} ms; "
              f"run after the batch's remaining {remaining} steps its first token comes in {wait * 1e3:.1f} ms "
              f"({wait / busy:.1f}x the engine's)")
    llm.shutdown()


if __name__ == "__main__":
    main()
